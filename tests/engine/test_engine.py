"""The plain-PyTorch training parts: epoch stats and validation over ranks, per-rank random
streams, non-finite losses under mixed precision, and resuming from a saved state."""

import math
import random
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config.params import TrainParams
from pipeline.data.augment import train_transform
from pipeline.engine.loop import (
    DDP_OPTIONS,
    all_reduce_stats,
    build_optimizer,
    build_scheduler,
    evaluate,
    restore_training_state,
    seed_epoch,
    share_buffers,
    train_one_epoch,
    training_state,
)
from pipeline.metrics.confusion import ConfusionMatrix, collective_device

# Two ranks with different losses, image counts, skipped steps and times.
RANK_STATS = [{"loss": 1.0, "loss_images": 8, "images": 8, "steps": 4, "skipped_steps": 0, "seconds": 2.0,
               "data_wait_seconds": 0.5},
              {"loss": 3.0, "loss_images": 4, "images": 6, "steps": 3, "skipped_steps": 1, "seconds": 5.0,
               "data_wait_seconds": 0.25}]


def _in_group(rank: int, work, world: int, store_path: str, results) -> None:
    # A forked child cannot use the OpenMP thread pool of a parent that already ran parallel
    # torch ops (another test did): its first parallel region would wait forever.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        results[rank] = work(rank)
    finally:
        dist.destroy_process_group()


def on_ranks(work, world: int, tmp_path) -> dict:
    """``{rank: work(rank)}`` from ``world`` processes in one gloo group. fork, not spawn:
    no fresh interpreter importing torch again in each child."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_in_group, args=(work, world, str(tmp_path / "store"), results), nprocs=world,
                           join=True, start_method="fork")
        return dict(results)


def _reduce_stats(rank: int) -> dict:
    return all_reduce_stats(RANK_STATS[rank])


def test_stats_without_a_process_group_are_this_ranks():
    assert all_reduce_stats(RANK_STATS[1]) == RANK_STATS[1]


def test_stats_over_two_ranks_weigh_loss_by_images_and_take_the_slowest_time(tmp_path):
    results = on_ranks(_reduce_stats, 2, tmp_path)
    expected = {"loss": pytest.approx((1.0 * 8 + 3.0 * 4) / 12), "loss_images": 12, "images": 14,
                "steps": 7, "skipped_steps": 1, "seconds": 5.0, "data_wait_seconds": 0.5}
    assert results[0] == expected and results[1] == expected



# --- DistributedDataParallel's settings ------------------------------------------------

def _ddp_steps(rank: int) -> dict:
    """Three SGD steps of a conv + batch-norm net on rank-own data under DDP with its
    defaults and with ``DDP_OPTIONS``; each net's parameters and buffers after them, and
    the ``DDP_OPTIONS`` net's buffers again after ``share_buffers``."""
    out = {}
    for name, options in (("default", {}), ("ours", DDP_OPTIONS)):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        model = nn.parallel.DistributedDataParallel(net, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8, generator=g) * (1 + rank)
            y = torch.randint(0, 2, (2, 8, 8), generator=g)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        out[name] = {"params": [p.detach().clone() for p in net.parameters()],
                     "buffers": [b.clone() for b in net.buffers()]}
    share_buffers(net)
    out["shared"] = [b.clone() for b in net.buffers()]
    return out


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_ddp_options_train_the_same_weights_and_validation_shares_rank_0s_statistics(tmp_path):
    results = on_ranks(_ddp_steps, 2, tmp_path)
    zero, one = results[0], results[1]
    for rank in (0, 1):        # the same steps as DDP's defaults take, bit for bit
        assert _equal(results[rank]["ours"]["params"], zero["default"]["params"])
    # Rank 0's batch-norm statistics (what it saves) are the defaults' too; rank 1's follow
    # its own batches until validation shares rank 0's.
    assert _equal(zero["ours"]["buffers"], zero["default"]["buffers"])
    assert not torch.equal(one["ours"]["buffers"][0], zero["ours"]["buffers"][0])
    for rank in (0, 1):
        assert _equal(results[rank]["shared"], zero["ours"]["buffers"])


def test_sharing_buffers_without_a_process_group_changes_nothing():
    net = nn.BatchNorm2d(2)
    net.running_mean.fill_(3.0)
    share_buffers(net)
    assert net.running_mean.tolist() == [3.0, 3.0]


# --- Validation over ranks (issue 15, item 7) -------------------------------------------

NUM_CLASSES, IGNORE = 3, 255


def fixed_model() -> nn.Module:
    """A 1x1 convolution with fixed weights: every rank predicts the same."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, 1)


def val_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank 0: one batch of 2 images, rank 1: two batches of 1 and 3, rank 2: none."""
    sizes = {0: [2], 1: [1, 3], 2: []}[rank]
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(10 * rank + i)
        x = torch.randn(n, 3, 8, 8, generator=g)
        y = torch.randint(0, NUM_CLASSES, (n, 8, 8), generator=g)
        y[:, 0] = IGNORE
        out.append((x, y))
    return out


def _evaluate(rank: int) -> tuple:
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    cm, loss = evaluate(fixed_model(), val_batches(rank), ConfusionMatrix(NUM_CLASSES, IGNORE),
                        torch.device("cpu"), loss_fn)
    return cm.mat.tolist(), loss, str(cm.mat.device)


def test_validation_over_ranks_reduces_loss_and_counts_even_from_a_rank_without_rows(tmp_path):
    results = on_ranks(_evaluate, 3, tmp_path)
    # The same split in one process: what every rank must report.
    everything = [b for rank in range(3) for b in val_batches(rank)]
    cm, loss = evaluate(fixed_model(), everything, ConfusionMatrix(NUM_CLASSES, IGNORE), torch.device("cpu"),
                        nn.CrossEntropyLoss(ignore_index=IGNORE))
    for rank in range(3):
        mat, rank_loss, device = results[rank]
        assert mat == cm.mat.tolist(), rank
        assert rank_loss == pytest.approx(loss, rel=1e-6), rank
        assert device == "cpu"


def test_collectives_run_on_the_device_of_the_process_groups_backend():
    assert collective_device("nccl") == torch.device("cuda")
    assert collective_device("gloo") == torch.device("cpu")
    # A confusion matrix that saw no batch is already where its backend reduces.
    assert ConfusionMatrix(NUM_CLASSES, IGNORE, device=torch.device("meta")).mat.device.type == "meta"


def test_an_epochs_random_streams_depend_on_seed_epoch_and_rank_only():
    """A resumed run draws at epoch e what an uninterrupted one draws there, and each rank
    draws its own: Python, NumPy, torch and the augmentation alike."""
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    transform = train_transform((32, 32), (0.5, 2.0), 0.2, IGNORE, seed=0)

    def draws() -> tuple:
        out = transform(image=image, mask=mask)["image"]
        return random.random(), float(np.random.rand()), float(torch.rand(1)), out.tobytes()

    seed_epoch(7, 2, 1, transform)
    first = draws()
    for _ in range(3):                     # what a longer run would have drawn before
        draws()
    seed_epoch(7, 2, 1, transform)
    assert draws() == first
    for other in ((7, 2, 0), (7, 1, 1), (8, 2, 1)):
        seed_epoch(*other, transform)
        again = draws()
        assert all(a != b for a, b in zip(again, first, strict=True)), other


# --- Mixed precision and non-finite losses (issue 15, item 8) ------------------------------


class InfOnce(nn.Module):
    """Cross-entropy, except that call number ``at`` returns +inf (an fp16 overflow)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls, self.ce = at, 0, nn.CrossEntropyLoss(ignore_index=IGNORE)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ce(logits, target)
        return loss * float("inf") if self.calls == self.at else loss


def tiny_run(steps: int = 4):
    cfg = TrainParams.defaults(epochs=1, warmup_epochs=0, channels_last=False, lr=0.05, grad_clip=1.0)
    model = fixed_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    batches = [b for rank in (0, 1, 0) for b in val_batches(rank)][:steps]
    return cfg, model, optimizer, scheduler, batches


@pytest.mark.parametrize("scaler", [None, "cpu"], ids=["fp32", "grad-scaler"])
def test_a_non_finite_loss_skips_its_step_and_the_epoch_goes_on(scaler):
    cfg, model, optimizer, scheduler, batches = tiny_run()
    grad_scaler = torch.amp.GradScaler(scaler, init_scale=2.0**4) if scaler else None
    updates = []

    def watch(batches):
        for batch in batches:
            before = [p.detach().clone() for p in model.parameters()]
            yield batch
            updates.append(before)

    stats = train_one_epoch(model, watch(batches), InfOnce(at=2), optimizer, scheduler, cfg,
                            torch.device("cpu"), grad_scaler)
    assert stats["skipped_steps"] == 1 and stats["steps"] == 4
    assert math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Step 2 (the inf) left the weights as they were; steps 1, 3 and 4 moved them.
    after = updates[1:] + [[p.detach() for p in model.parameters()]]
    moved = [not all(torch.equal(a, b) for a, b in zip(before, later, strict=True))
             for before, later in zip(updates, after, strict=True)]
    assert moved == [True, False, True, True]
    if grad_scaler is not None:
        assert grad_scaler.get_scale() < 2.0**4          # it backed off, as GradScaler does


def test_an_epoch_of_nothing_but_non_finite_losses_fails_with_a_clear_message():
    cfg, model, optimizer, scheduler, batches = tiny_run()

    def always_inf(logits, target):
        return logits.sum() * float("inf")

    with pytest.raises(FloatingPointError, match=r"all 4 steps .* non-finite loss"):
        train_one_epoch(model, batches, always_inf, optimizer, scheduler, cfg, torch.device("cpu"),
                        torch.amp.GradScaler("cpu"))


# --- Resume (issue 15, item 17) -------------------------------------------------------------


def test_a_resume_restores_weights_optimiser_and_learning_rate_exactly(tmp_path):
    """A checkpoint saved mid-schedule and loaded into fresh objects gives identical state,
    and the next step from it is the step the uninterrupted run takes."""
    cfg = TrainParams.defaults(epochs=2, warmup_epochs=0.5, channels_last=True, lr=0.05)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    batches = [b for rank in (0, 1) for b in val_batches(rank)]

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, NUM_CLASSES, 1)).to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        return model, optimizer, build_scheduler(optimizer, cfg, len(batches))

    model, optimizer, scheduler = fresh(0)
    train_one_epoch(model, batches[:3], loss_fn, optimizer, scheduler, cfg, torch.device("cpu"))
    torch.save(training_state(model, optimizer, scheduler, None, epoch=0, best_miou=0.25),
               tmp_path / "state.pt")

    model2, optimizer2, scheduler2 = fresh(1)             # other initial weights
    state = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=False)
    assert restore_training_state(state, model2, optimizer2, scheduler2, None) == (1, 0.25)

    assert_same_state(model.state_dict(), model2.state_dict())
    assert_same_state(optimizer.state_dict(), optimizer2.state_dict())
    assert scheduler.state_dict() == scheduler2.state_dict()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() != [cfg.lr, cfg.lr]
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    # The next steps agree to the last bit.
    for m, o, s in ((model, optimizer, scheduler), (model2, optimizer2, scheduler2)):
        train_one_epoch(m, batches[3:], loss_fn, o, s, cfg, torch.device("cpu"))
    assert_same_state(model.state_dict(), model2.state_dict())
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def assert_same_state(a, b, where: str = "") -> None:
    """Equal nested state dicts: tensors bit for bit (and dtype), everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# After the tests that fork ranks: a backward in this process first can hang a forked rank's
# OpenMP convolution.
def test_an_epoch_reports_the_time_spent_waiting_for_batches():
    cfg, model, optimizer, scheduler, batches = tiny_run()

    def slow(batches, delay=0.05):
        for batch in batches:
            time.sleep(delay)
            yield batch

    batches = list(batches)
    stats = train_one_epoch(model, slow(batches), nn.CrossEntropyLoss(ignore_index=IGNORE), optimizer,
                            scheduler, cfg, torch.device("cpu"))
    assert len(batches) * 0.05 <= stats["data_wait_seconds"] < stats["seconds"]
    stats = train_one_epoch(model, iter(batches), nn.CrossEntropyLoss(ignore_index=IGNORE), optimizer,
                            scheduler, cfg, torch.device("cpu"))
    assert stats["data_wait_seconds"] < 0.05
