"""The function each Ray Train worker runs: a thin Ray shell around ``pipeline.engine.loop``.

Ray adds the dataset shard, ``prepare_model`` (DDP and the device), ``report`` with a
checkpoint each epoch and ``get_checkpoint`` to resume; everything else is plain
PyTorch. Rank 0 alone writes checkpoints and logs to MLflow, into the one run the
driver opened.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.artifacts.model_dir import CONFIG_FILE
from pipeline.artifacts.storage import COMPLETE_MARKER, Location
from pipeline.config import paths
from pipeline.config.params import LossParams, ModelParams, TrainParams
from pipeline.engine import priority
from pipeline.engine.budget import planned_epochs
from pipeline.engine.loop import (
    DDP_OPTIONS,
    all_reduce_stats,
    build_optimizer,
    build_scheduler,
    evaluate,
    memory_format,
    replan,
    restore_training_state,
    seed_epoch,
    seed_everything,
    share_buffers,
    slowest_rank,
    train_one_epoch,
    training_state,
)
from pipeline.engine.progress import append_record, epoch_record
from pipeline.models.base import ModelMeta
from pipeline.models.registry import build_model
from pipeline.tasks import get_task
from pipeline.tasks.base import Task
from pipeline.utils import console
from pipeline.utils.io import write_bytes_atomic, write_json_atomic

log = logging.getLogger("pipeline.engine.worker")

STATE_FILE = "state.pt"          # training state: model, optimiser, scheduler, scaler, epoch
META_FILE = CONFIG_FILE          # the model's description, as in a saved model folder


def train_worker(config: dict[str, Any]) -> None:
    # The driver's settings (absolute paths), whatever environment Ray started us in.
    os.environ.update(config.get("env", {}))
    if config.get("weights") is not None:
        os.environ[paths.ENV_WEIGHTS_DIR] = str(fetch_weights(config["weights"]))
    console.quiet_ray_train_worker(config.get("ray_log_level", console.DEFAULT_RAY_LOG_LEVEL))
    cfg = TrainParams.model_validate(config["train"])
    model_cfg = ModelParams.model_validate(config["model"])
    loss_cfg = LossParams.model_validate(config["loss"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or max(1, math.floor(cfg.cpus_per_worker)))
    seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()
    num_classes, ignore = config["num_classes"], config["ignore_index"]
    names = config["class_names"]
    task = get_task(config["task"])
    primary = f"val_{task.primary_metric}"

    meta = model_meta(config)
    model = build_model(model_cfg, num_classes, meta).to(memory_format=memory_format(cfg.channels_last))
    loss_fn = task.build_loss(loss_cfg, num_classes, ignore, config.get("class_weights")).to(device)
    optimizer = build_optimizer(model, cfg)
    per_worker = config["n_train"] // world
    steps = max(1, per_worker // cfg.batch_size if per_worker >= cfg.batch_size else 1)
    scheduler = build_scheduler(optimizer, cfg, steps)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_epoch, best, elapsed, planned = 0, float("-inf"), 0.0, cfg.epochs
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        start_epoch, best = restore_training_state(state, model, optimizer, scheduler, scaler)
        # The time budget's clock and plan go on where the checkpoint left them.
        elapsed, planned = state.get("elapsed_s", 0.0), state.get("planned_epochs", cfg.epochs)
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes is not None else None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)
    plain = model.module if hasattr(model, "module") else model
    if config.get("local_cluster_root"):
        lower_cluster_background(config["local_cluster_root"], rank, world)

    norm = {"mean": config["mean"], "std": config["std"], "ignore_index": ignore}
    transform = task.train_transform(cfg.crop_size, cfg.scale_range, cfg.color_jitter, ignore)
    train_collate = TrainCollate(task, transform, norm)
    train_shard = ray.train.get_dataset_shard("train")
    # Validation rows are read once and kept encoded: re-reading a small split through
    # Ray Data each epoch costs seconds of scheduling for milliseconds of data.
    val_rows = _rank_rows(ray.train.get_dataset_shard("val"), task, cfg.val_batch_size, rank, world)
    client, run_id = _mlflow(config) if rank == 0 else (None, None)
    nodes = _count_nodes(world)

    epoch = start_epoch
    while epoch < planned:                  # a time budget re-plans the epochs after each one
        epoch_start = time.perf_counter()
        # This rank's random streams for this epoch, the same in a resumed run as in an
        # uninterrupted one (augmentation included).
        seed_epoch(cfg.seed, epoch, rank, transform)
        # Ray Data decodes and augments the next batch in its collate thread while this
        # one trains; one thread (prefetch_batches=1) keeps the augmentation's random
        # stream in batch order.
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=per_worker >= cfg.batch_size, collate_fn=train_collate,
            prefetch_batches=1, pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed + 7919 * epoch,
        )
        # Loss and images/s of the whole worker group, not of this rank alone.
        stats = all_reduce_stats(train_one_epoch(model, batches, loss_fn, optimizer, scheduler, cfg, device,
                                                 scaler, task))
        start_val = time.perf_counter()
        val_batches = (task.collate(images, targets, **norm) for images, targets in val_rows)
        share_buffers(plain)            # every rank validates the model rank 0 saves
        # Reduced over all ranks inside: counts and the loss of the whole split.
        metric = task.metric(num_classes, ignore, device, meta.thing_classes)
        metric, val_loss = evaluate(plain, val_batches, metric, device, loss_fn,
                                    channels_last=cfg.channels_last, task=task)
        val = task.epoch_metrics(metric.compute(), names)
        # Every rank plans with the slowest one's epoch time, so all stop after the same epoch.
        epoch_s = slowest_rank(time.perf_counter() - epoch_start)
        elapsed += epoch_s
        planned = planned_epochs(cfg.epochs, epoch + 1, elapsed, epoch_s, budget_s)
        replan(scheduler, planned, steps)
        is_best = val[primary] > best
        best = max(best, val[primary])
        metrics = {
            "epoch": epoch, "start_epoch": start_epoch, "nodes": nodes, "workers": world,
            "train_loss": stats["loss"], "val_loss": val_loss, "train_skipped_steps": stats["skipped_steps"],
            "train_images_per_s": stats["images"] / stats["seconds"],
            "train_seconds": stats["seconds"], "train_data_wait_s": stats["data_wait_seconds"],
            "val_seconds": time.perf_counter() - start_val,
            "lr": scheduler.get_last_lr()[0], "is_best": float(is_best), f"best_{primary}": best,
            "elapsed_s": elapsed, "planned_epochs": planned,
            **val,
        }
        if rank == 0:
            if client is not None:
                from pipeline.artifacts.tracking import log_epoch
                log_epoch(client, run_id, metrics, step=epoch)
            with tempfile.TemporaryDirectory() as d:
                state = training_state(plain, optimizer, scheduler, scaler, epoch, best) | {
                    "elapsed_s": elapsed, "planned_epochs": planned}
                torch.save(state, Path(d) / STATE_FILE)
                write_json_atomic(Path(d) / META_FILE, {
                    "model": model_cfg.model_dump(mode="json"), "num_classes": num_classes,
                    "meta": meta.to_dict(), "epoch": epoch, "metrics": metrics,
                    "params": {"train": config["train"], "loss": config["loss"]},
                })
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            if config.get("progress") is not None:
                # Once the checkpoint is safe: the driver prints this epoch as done.
                append_record(config["progress"], epoch_record(metrics, planned, primary, task.primary_label))
        else:
            ray.train.report(metrics, checkpoint=None)
        epoch += 1


def fetch_weights(published: Location) -> Path:
    """The pretrained weight files the driver published to the shared storage
    (``train.shipped_weights``), copied once into a local folder named by their content: this
    node may not have the driver's ``$SEG_WEIGHTS_DIR``."""
    folder = Path(tempfile.gettempdir()) / f"seg-weights-{published.name}"
    if not (folder / COMPLETE_MARKER).is_file():
        for name in published.child(COMPLETE_MARKER).read_text().splitlines():
            write_bytes_atomic(folder / name, published.child(name).read_bytes())
        write_bytes_atomic(folder / COMPLETE_MARKER, b"")
    return folder


def model_meta(config: dict) -> ModelMeta:
    """The meta of the model a training run (``train.worker_config``) builds."""
    return ModelMeta(class_names=config["class_names"], palette=config["palette"], mean=config["mean"],
                     std=config["std"], ignore_index=config["ignore_index"], task=config["task"],
                     thing_classes=config["thing_classes"])


class TrainCollate(NumpyBatchCollateFn):
    """Ray Data's last step for a training batch: {"image", <the task's target columns>} arrays
    of encoded rows -> the task's (images (N, 3, H, W) float32 normalised, targets), augmented."""

    def __init__(self, task: Task, transform, norm: dict[str, Any]):
        self.task, self.transform, self.norm = task, transform, norm

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, Any]:
        return self.task.collate(batch["image"], self.task.targets_of(batch), transform=self.transform,
                                 **self.norm)


def lower_cluster_background(root: int, rank: int, world: int) -> None:
    """Rank 0 puts the local cluster's own processes (every descendant of the train
    stage's process ``root`` but the training workers) at the lowest CPU priority
    (``pipeline.engine.priority``)."""
    workers = [os.getpid()]
    if world > 1 and torch.distributed.is_initialized():
        workers = [None] * world
        torch.distributed.all_gather_object(workers, os.getpid())
    if rank == 0:
        lowered = priority.lower_background(root, keep=set(workers))
        log.debug("%d processes of the local cluster now at nice %d", len(lowered), priority.BACKGROUND_NICE)


def _rank_rows(dataset, task: Task, batch_size: int, rank: int, world: int) -> list[tuple[list, list]]:
    """This rank's share of the whole validation split, every ``world``-th row, as
    batches of (encoded images, targets: ``task.targets_of`` the rows).

    Every worker reads the unsplit split but keeps only its own rows, so each row is
    evaluated exactly once and the summed confusion matrices cover the split exactly.
    """
    mine_images, mine_masks, index = [], [], 0
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        for image, mask in zip(batch["image"], task.targets_of(batch), strict=True):
            if index % world == rank:
                mine_images.append(image)
                mine_masks.append(mask)
            index += 1
    return [(mine_images[i:i + batch_size], mine_masks[i:i + batch_size])
            for i in range(0, len(mine_images), batch_size)]


def _count_nodes(world: int) -> int:
    """How many distinct Ray nodes the workers run on (logged; checked by the tests)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return 1
    gathered: list[str | None] = [None] * world
    torch.distributed.all_gather_object(gathered, node)
    return len(set(gathered))


def _mlflow(config: dict):
    spec = config.get("mlflow")
    if not spec:
        return None, None
    from mlflow.tracking import MlflowClient
    return MlflowClient(spec["tracking_uri"]), spec["run_id"]

