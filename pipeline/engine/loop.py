"""The plain PyTorch parts of training: optimiser, schedule, one epoch, evaluation.

No Ray and no MLflow here (STYLE section 4): the Ray Train worker, a test and a
notebook all call these same functions.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config.params import TrainParams
from pipeline.metrics.confusion import collective_device
from pipeline.tasks.base import Metric, Task


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (``torch.channels_last``) or NCHW for the model's weights and its inputs.

    oneDNN's CPU convolutions and cuDNN's tensor-core ones run faster on NHWC: measured
    here, a training step of the default Unet-MobileNetV2 is about a quarter shorter on
    the CPU, with one thread or two (README, "Training").
    """
    return torch.channels_last if channels_last else torch.contiguous_format


def build_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, poly_power: float) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then cosine or poly."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "poly":
        return (1.0 - progress) ** poly_power
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """``lr_factor`` over ``total_steps``, as ``LambdaLR``'s multiplier. An object, not a lambda,
    so that ``LambdaLR.state_dict()`` saves its attributes: a time budget re-plans
    ``total_steps`` (``replan``), and a resumed run must go on with that plan."""

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str, poly_power: float):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.schedule, self.poly_power = schedule, poly_power

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.schedule, self.poly_power)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule over ``cfg.epochs * steps_per_epoch`` steps."""
    schedule = LRSchedule(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                          cfg.schedule, cfg.poly_power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def replan(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs: int, steps_per_epoch: int) -> None:
    """End ``build_scheduler``'s schedule after ``epochs`` epochs instead (a time budget's plan,
    ``pipeline.engine.budget``); the learning rate of the next step follows the new plan."""
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = epochs * steps_per_epoch


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainParams,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    task: Task | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of (images (N,3,H,W) float, masks (N,H,W) int64).

    Returns ``loss`` (the mean over the images of steps with a finite loss),
    ``loss_images`` (those images), ``images``, ``steps``, ``skipped_steps``, ``seconds``
    and ``data_wait_seconds`` (of those, the time spent waiting for the next batch: the
    data pipeline's stall). Mixed precision (fp16 autocast) runs when a ``scaler`` is given. Images
    go to the model in ``memory_format(cfg.channels_last)``, the layout the model should
    already be in. ``task`` (default: semantic segmentation) moves the targets and takes
    the step's loss (``Task.targets_to``, ``Task.training_loss``).

    A step whose loss or gradients are not finite changes no weight and the epoch goes
    on: ``GradScaler`` skips it (and lowers its scale), as it is meant to; without one
    the step is skipped here. An epoch in which every loss was non-finite raises
    ``FloatingPointError``: training has diverged, and retrying from the same state
    would only repeat it.
    """
    model.train()
    total_loss, loss_images, images, steps, skipped, nonfinite = 0.0, 0, 0, 0, 0, 0
    start = time.perf_counter()
    use_amp = scaler is not None
    layout = memory_format(cfg.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    task = task or _default_task()
    batches, waited = iter(batches), 0.0
    while True:
        asked = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - asked
        x, y = x.to(device, non_blocking=True, memory_format=layout), task.targets_to(y, device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = task.training_loss(model, x, y, loss_fn)
        loss = loss.float()
        finite = bool(torch.isfinite(loss))
        # Backward even through a non-finite loss: under DDP every rank's backward joins
        # the gradient all-reduce (a rank that left it out would hang the others), and
        # the non-finite gradients it spreads make every rank skip this same step.
        if use_amp:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        elif not use_amp:
            norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if use_amp:
            scale = scaler.get_scale()
            scaler.step(optimizer)           # skipped when the unscaled gradients hold inf/NaN
            scaler.update()
            stepped = scaler.get_scale() >= scale
        else:
            stepped = bool(torch.isfinite(norm))
            if stepped:
                optimizer.step()
        scheduler.step()                     # the schedule counts steps taken or skipped
        steps += 1
        skipped += not stepped
        nonfinite += not finite
        images += x.shape[0]
        if finite:
            total_loss += loss.item() * x.shape[0]
            loss_images += x.shape[0]
    if steps and nonfinite == steps:
        raise FloatingPointError(
            f"all {steps} steps of this epoch had a non-finite loss (up to step {scheduler.last_epoch}): "
            "training has diverged; lower train.lr, set train.grad_clip, or set train.amp: false"
        )
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(1, loss_images), "loss_images": loss_images, "images": images,
            "steps": steps, "skipped_steps": skipped, "seconds": seconds, "data_wait_seconds": waited}


def all_reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """``train_one_epoch``'s stats over all ranks of the default process group: the mean
    loss over every rank's counted images, the sums of images, steps and skipped steps,
    and the slowest rank's seconds (the epoch ends when it does) and data wait. Unchanged
    without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    loss_sum, loss_images, images, steps, skipped = _all_reduce_sums(
        stats["loss"] * stats["loss_images"], stats["loss_images"], stats["images"], stats["steps"],
        stats["skipped_steps"])
    device = collective_device(dist.get_backend())
    slowest = torch.tensor([stats["seconds"], stats.get("data_wait_seconds", 0.0)], dtype=torch.float64,
                           device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seconds, waited = slowest.tolist()
    return {"loss": loss_sum / max(1.0, loss_images), "loss_images": int(loss_images), "images": int(images),
            "steps": int(steps), "skipped_steps": int(skipped), "seconds": seconds,
            "data_wait_seconds": waited}


def slowest_rank(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (unchanged without a process group): what all
    ranks then decide on together, as a time budget's plan must be."""
    if not (dist.is_available() and dist.is_initialized()):
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    metric: Metric,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    channels_last: bool = False,
    task: Task | None = None,
) -> tuple[Metric, float]:
    """``metric`` (a task's accumulator, e.g. a ``ConfusionMatrix``) updated with the model's
    outputs over all ``batches``, and the mean loss per image; when a default process group
    is initialised, over the batches of every rank (each rank must call it; a rank with no
    batches adds nothing). ``channels_last``: pass the images in NHWC, for a model converted
    to it. The loss is NaN when batches came but none gave a loss (no ``loss_fn``, or a task
    whose ``validation_step`` takes none: Mask R-CNN computes no losses in eval mode), 0.0
    without batches. ``task`` (default: semantic segmentation) moves the targets and runs
    the model (``Task.targets_to``, ``Task.validation_step``)."""
    model.eval()
    task = task or _default_task()
    total_loss, images, loss_images = 0.0, 0, 0
    layout = memory_format(channels_last)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True, memory_format=layout), task.targets_to(y, device)
        outputs, loss = task.validation_step(model, x, y, loss_fn)
        if loss is not None:
            total_loss += loss.item() * x.shape[0]
            loss_images += x.shape[0]
        images += x.shape[0]
        metric.update(outputs, y)
    metric.all_reduce()
    total_loss, images, loss_images = _all_reduce_sums(total_loss, images, loss_images)
    if images and not loss_images:      # batches, but no loss taken
        return metric, math.nan
    return metric, total_loss / max(1, loss_images)


def _default_task() -> Task:
    from pipeline.tasks import get_task

    return get_task("semantic")


def _all_reduce_sums(*values: float) -> list[float]:
    """``values`` summed over the ranks of the default process group (as given without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    sums = torch.tensor(values, dtype=torch.float64, device=collective_device(dist.get_backend()))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums.tolist()


# DistributedDataParallel's settings for the training workers (``ray.train.torch.prepare_model``).
DDP_OPTIONS = {
    # Rank 0's buffers are broadcast once at the start, not before every training forward
    # pass (DDP's default): in training mode batch norm normalises with each batch's own
    # statistics, so the running statistics matter only to validation, where
    # ``share_buffers`` gives every rank rank 0's once per epoch, instead of a collective
    # (and so a wait for the slowest rank) every step. Rank 0's own buffers, the ones its
    # checkpoint saves, are the same either way: it is the broadcast's source.
    "forward_sync_buffers": False,
    # The gradients are views into the all-reduce buckets: no copy into them and back each step.
    "gradient_as_bucket_view": True,
}


def share_buffers(model: nn.Module, src: int = 0) -> None:
    """Every rank's buffers (batch norm's running statistics) set to rank ``src``'s, so that
    each rank validates the model rank ``src`` saves; with ``DDP_OPTIONS`` each rank's own
    running statistics otherwise follow its own batches. Unchanged without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed for one rank's epoch, well mixed from (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and every GPU) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int, transform: Any = None) -> None:
    """Start ``rank``'s random streams for ``epoch``: the global generators and the
    augmentation's own (an albumentations ``Compose`` ignores the global ones).

    Each epoch's draws then depend on (seed, epoch, rank) only, so a run resumed at
    epoch e draws what an uninterrupted one draws there, on every rank, instead of
    replaying epoch 0's augmentations or giving every rank rank 0's stream; no
    generator state needs to be saved in a checkpoint.
    """
    value = epoch_seed(seed, epoch, rank)
    seed_everything(value)
    if transform is not None:
        transform.set_random_seed(value)


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None, epoch: int, best_miou: float,
) -> dict[str, Any]:
    """Everything a resume needs after ``epoch`` (0-based) ended, for ``torch.save``:
    weights (of the plain model, not a DDP wrapper), optimiser, schedule, GradScaler."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "epoch": epoch, "best_miou": best_miou,
    }


def restore_training_state(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
) -> tuple[int, float]:
    """Load ``training_state``'s dict into freshly built objects (the same recipe);
    returns (first epoch to train, best validation mIoU so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["best_miou"]
