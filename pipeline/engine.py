"""The plain PyTorch parts of training: optimiser, schedule, one epoch, evaluation.

No Ray and no MLflow here (STYLE section 4): the Ray Train worker, a test and a
notebook all call these same functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.metrics import ConfusionMatrix
from pipeline.params import TrainParams


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


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: TrainParams) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then cosine or poly."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if cfg.schedule == "poly":
        return (1.0 - progress) ** cfg.poly_power
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule over ``cfg.epochs * steps_per_epoch`` steps."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg)
    )


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainParams,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of (images (N,3,H,W) float, masks (N,H,W) int64).

    Returns the mean loss, the number of images and the seconds taken. Mixed precision
    runs only when a ``scaler`` is given (CUDA). Images go to the model in
    ``memory_format(cfg.channels_last)``, the layout the model should already be in.
    """
    model.train()
    total_loss, images, start = 0.0, 0, time.perf_counter()
    use_amp = scaler is not None and device.type == "cuda"
    layout = memory_format(cfg.channels_last)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {scheduler.last_epoch}")
        if use_amp:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if use_amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * x.shape[0]
        images += x.shape[0]
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(1, images), "images": images, "seconds": seconds}


def all_reduce_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """``train_one_epoch``'s stats over all ranks of the default process group: the mean
    loss over every rank's images, the images of all ranks, and the slowest rank's seconds
    (the epoch ends when it does). Unchanged without a process group.

    The tensors live on ``device``: NCCL reduces only GPU tensors, gloo CPU ones.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    as_tensor = {"dtype": torch.float64, "device": device}
    sums = torch.tensor([stats["loss"] * stats["images"], stats["images"]], **as_tensor)
    slowest = torch.tensor([stats["seconds"]], **as_tensor)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, images = sums.tolist()
    return {"loss": loss_sum / max(1.0, images), "images": int(images), "seconds": slowest.item()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    channels_last: bool = False,
) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix over all ``batches`` (not reduced across workers) and the mean loss.
    ``channels_last``: pass the images in NHWC, for a model converted to it."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    total_loss, images = 0.0, 0
    layout = memory_format(channels_last)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)
        logits = model(x).float()
        if loss_fn is not None:
            total_loss += loss_fn(logits, y).item() * x.shape[0]
        images += x.shape[0]
        cm.update(logits.argmax(1), y)
    return cm, total_loss / max(1, images)
