"""``train.max_minutes``: the epochs a wall-clock budget plans, and the learning-rate schedule
fitted to them (``pipeline.engine.budget``, ``pipeline.engine.loop.replan``)."""

import pytest
import torch
from torch import nn

from pipeline.config.params import TrainParams
from pipeline.engine.budget import planned_epochs
from pipeline.engine.loop import build_optimizer, build_scheduler, lr_factor, replan


def test_without_a_budget_train_epochs_decides():
    assert planned_epochs(10, done=3, elapsed_s=1e9, epoch_s=60, budget_s=None) == 10


@pytest.mark.parametrize("done, elapsed_s, epoch_s, expected", [
    (1, 60, 60, 10),        # 540 s left at 60 s an epoch: 9 more
    (1, 60, 61, 9),         # 540 s hold only 8 more of 61 s
    (3, 590, 60, 3),        # 10 s left: no other epoch ends within the budget
    (3, 700, 60, 3),        # over budget already (a long first epoch): never fewer than done
    (1, 1, 1, 20),          # fast epochs: never more than train.epochs
])
def test_the_epochs_that_end_within_the_budget_at_the_last_epoch_s_pace(done, elapsed_s, epoch_s, expected):
    assert planned_epochs(20, done, elapsed_s, epoch_s, budget_s=600) == expected


def schedule(epochs: int = 10, steps: int = 4):
    cfg = TrainParams.defaults(epochs=epochs, warmup_epochs=0.5, schedule="cosine", lr=0.1)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    return cfg, optimizer, build_scheduler(optimizer, cfg, steps)


def test_a_shorter_plan_ends_the_schedule_with_the_planned_epochs():
    cfg, optimizer, scheduler = schedule()
    for _ in range(4):                     # epoch 0 of 10
        optimizer.step()
        scheduler.step()
    replan(scheduler, 2, 4)                # the budget holds two epochs
    lrs = []
    for _ in range(4):                     # epoch 1, the last
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    expected = [cfg.lr * lr_factor(step, 8, 2, "cosine", cfg.poly_power) for step in range(5, 9)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)     # the schedule's end: cosine at zero


def test_a_resumed_run_goes_on_with_the_plan_its_checkpoint_saved():
    _, optimizer, scheduler = schedule()
    replan(scheduler, 3, 4)
    _, optimizer2, resumed = schedule()                  # built from params: 10 epochs
    resumed.load_state_dict(scheduler.state_dict())
    assert {s.total_steps for s in resumed.lr_lambdas} == {12}     # one per parameter group


def test_a_checkpoint_of_a_schedule_before_budgets_still_loads():
    """Checkpoints written when the multiplier was a lambda hold no attributes for it."""
    _, optimizer, scheduler = schedule()
    state = scheduler.state_dict() | {"lr_lambdas": [None, None]}
    scheduler.load_state_dict(state)
    assert {s.total_steps for s in scheduler.lr_lambdas} == {40}
    assert torch.isfinite(torch.tensor(scheduler.get_last_lr())).all()
