"""Training images per second: the Ray Train + Ray Data path against a plain PyTorch loop.

    python bench/train_bench.py [--quick] [--rounds R] [--data data/prepared] [--params params.yaml]

Any task: the prepared dataset's (its card) decides the batches, targets and loss, so
``--params recipes/dsb2018.yaml --data <prepared DSB 2018>`` measures Mask R-CNN.
Same model (the params' model section, random encoder weights), same images (the
first N training rows of the prepared dataset), same crop, augmentation and allocator
settings (``train.keep_freed_memory``), and the same resources: the Ray side runs the
params' layout (``train.num_workers`` workers of ``train.threads_per_worker`` torch
threads, ``train.batch_size`` images each), the plain loop one process with all of
those threads and the whole global batch (workers x batch size). Each run trains two
epochs and the second (warm) one is timed; every Ray run starts and stops its own
local cluster, so the plain loop never shares the machine with Ray's processes.

Runs alternate (plain, Ray, plain, ... plain; ``--rounds`` Ray runs) and each side's
mean is its figure, so drift in this machine's load hits both sides alike. Last line:
``RESULT ray_img_s=... torch_img_s=... ratio=...``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline.config import paths
from pipeline.config.params import LossParams, ModelParams, TrainParams, load_params  # noqa: E402
from pipeline.data import shards  # noqa: E402
from pipeline.engine.allocator import keep_freed_memory  # noqa: E402
from pipeline.engine.loop import build_optimizer, build_scheduler, memory_format, train_one_epoch  # noqa: E402
from pipeline.engine.worker import model_meta  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.tasks import task_of_data  # noqa: E402
from pipeline.train import fit, worker_config  # noqa: E402
from pipeline.utils.io import read_json, write_json_atomic  # noqa: E402


def subset(data: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A prepared dataset holding the first rows of ``data``'s train and val splits (all of
    them when a split has fewer)."""
    rows = {}
    for split, n in (("train", n_train), ("val", n_val)):
        table = shards.read_split(data, split).slice(0, n)
        rows[split] = table.num_rows
        (out / split).mkdir(parents=True)
        pq.write_table(table, out / split / shards.shard_name(0), row_group_size=shards.ROW_GROUP_ROWS)
    card = read_json(data / paths.CARD_JSON)
    card["splits"]["train"]["images"] = rows["train"]
    write_json_atomic(out / paths.CARD_JSON, card)
    write_json_atomic(out / paths.CLASSES_FILE, read_json(data / paths.CLASSES_FILE))
    return out


def torch_rate(data: Path, cfg: TrainParams, model_cfg: ModelParams, loss_cfg: LossParams) -> float:
    """Images/s of the second epoch of a plain loop over the same rows and transform,
    with ``cfg.threads_per_worker`` threads and batches of ``cfg.batch_size``."""
    config = worker_config(data, cfg, model_cfg, loss_cfg)
    _, task = task_of_data(data)
    torch.set_num_threads(cfg.threads_per_worker)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, config["num_classes"], model_meta(config))
    model = model.to(memory_format=memory_format(cfg.channels_last))
    loss_fn = task.build_loss(loss_cfg, config["num_classes"], config["ignore_index"],
                              config["class_weights"])
    optimizer = build_optimizer(model, cfg)
    steps = config["n_train"] // cfg.batch_size
    scheduler = build_scheduler(optimizer, cfg, steps)
    table = shards.read_split(data, "train", columns=["image", *task.target_columns])
    images = table.column("image").to_pylist()
    targets = task.targets_of({name: table.column(name).to_pylist() for name in task.target_columns})
    transform = task.train_transform(cfg.crop_size, cfg.scale_range, cfg.color_jitter, config["ignore_index"])
    norm = {"mean": config["mean"], "std": config["std"], "ignore_index": config["ignore_index"]}
    rate = 0.0
    for _ in range(2):
        batches = (task.collate(images[i:i + cfg.batch_size], targets[i:i + cfg.batch_size],
                                transform=transform, **norm)
                   for i in range(0, steps * cfg.batch_size, cfg.batch_size))
        stats = train_one_epoch(model, batches, loss_fn, optimizer, scheduler, cfg, torch.device("cpu"),
                                task=task)
        rate = stats["images"] / stats["seconds"]
    return rate


def ray_rate(
    data: Path, cfg: TrainParams, model_cfg: ModelParams, loss_cfg: LossParams, storage: Path
) -> tuple[float, float]:
    """Images/s of the second epoch through the train stage's own ``fit``, on a local
    cluster that is shut down afterwards, and that epoch's seconds waiting for data."""
    import ray

    try:
        result, _, _ = fit(data, cfg, model_cfg, loss_cfg, storage=storage, track=False)
    finally:
        ray.shutdown()
    # The last epoch's report (metrics_dataframe holds only the kept checkpoints).
    return float(result.metrics["train_images_per_s"]), float(result.metrics["train_data_wait_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images and one Ray run")
    parser.add_argument("--rounds", type=int, help="Ray runs, each followed by a plain one (default 2)")
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE, help="e.g. recipes/dsb2018.yaml")
    layout = parser.add_argument_group("another layout than params.yaml's train section")
    layout.add_argument("--workers", type=int, help="train.num_workers")
    layout.add_argument("--threads", type=int, help="train.threads_per_worker")
    layout.add_argument("--batch-size", type=int, help="train.batch_size (per worker)")
    args = parser.parse_args()
    if os.environ.get("RAY_ADDRESS"):
        raise SystemExit("train_bench: unset RAY_ADDRESS; the bench compares against a local cluster")
    rounds = args.rounds or (1 if args.quick else 2)
    cfg = load_params(TrainParams, args.params)
    overrides = {"num_workers": args.workers, "threads_per_worker": args.threads,
                 "batch_size": args.batch_size}
    cfg = TrainParams.model_validate(cfg.model_dump() | {k: v for k, v in overrides.items() if v is not None})
    model_cfg = load_params(ModelParams, args.params).without_pretrained_weights()
    loss_cfg = load_params(LossParams, args.params)
    n = 32 if args.quick else 128
    threads = cfg.threads_per_worker or max(1, math.floor(cfg.cpus_per_worker))
    ray_cfg = cfg.model_copy(update={"epochs": 2, "warmup_epochs": 0.0, "threads_per_worker": threads})
    plain_cfg = ray_cfg.model_copy(update={"num_workers": 1, "threads_per_worker": threads * cfg.num_workers,
                                           "batch_size": cfg.batch_size * cfg.num_workers})
    plain_runs, ray_runs, ray_waits = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.data, Path(tmp) / "prepared", n, 4)
        n = read_json(data / paths.CARD_JSON)["splits"]["train"]["images"]
        plain_runs.append(torch_rate(data, plain_cfg, model_cfg, loss_cfg))
        for i in range(rounds):
            rate, waited = ray_rate(data, ray_cfg, model_cfg, loss_cfg, Path(tmp) / f"ray{i}")
            ray_runs.append(rate)
            ray_waits.append(waited)
            plain_runs.append(torch_rate(data, plain_cfg, model_cfg, loss_cfg))
    torch_img_s, ray_img_s = statistics.mean(plain_runs), statistics.mean(ray_runs)
    backbone = getattr(model_cfg, "encoder_name", model_cfg.family)
    print(f"{n} images, {model_cfg.arch}/{backbone}, crop {cfg.crop_size}, "
          f"global batch {plain_cfg.batch_size}, {plain_cfg.threads_per_worker} threads in all")
    print(f"plain PyTorch loop : {torch_img_s:6.2f} images/s  (1 process x {plain_cfg.threads_per_worker} "
          f"threads, batch {plain_cfg.batch_size}; runs: {', '.join(f'{r:.2f}' for r in plain_runs)})")
    print(f"Ray Train + Data   : {ray_img_s:6.2f} images/s  ({cfg.num_workers} worker(s) x {threads} "
          f"thread(s), batch {cfg.batch_size} each; runs: {', '.join(f'{r:.2f}' for r in ray_runs)}; "
          f"waiting for data {', '.join(f'{w:.1f}' for w in ray_waits)} s of {n / ray_img_s:.1f} s)")
    ratio = ray_img_s / torch_img_s
    print(f"RESULT ray_img_s={ray_img_s:.2f} torch_img_s={torch_img_s:.2f} ratio={ratio:.3f} "
          f"workers={cfg.num_workers} threads_per_worker={threads}")


if __name__ == "__main__":
    main()
