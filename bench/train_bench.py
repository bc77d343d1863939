"""Training images per second: the Ray Train + Ray Data path against a plain PyTorch loop.

    python bench/train_bench.py [--quick] [--data data/prepared]

Same model (params.yaml's model section, random encoder weights), same images (the
first N training rows of the prepared dataset), same batch size, crop, augmentation and
torch thread count and allocator settings (``train.keep_freed_memory``); each side runs
two epochs and the second (warm) one is timed. The plain loop runs before and after the
Ray run and its mean is the baseline, so that a change in the machine's load during the
bench shows in both. Last line: ``RESULT ray_img_s=... torch_img_s=... ratio=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import paths, shards  # noqa: E402
from pipeline.allocator import keep_freed_memory  # noqa: E402
from pipeline.augment import collate, train_transform  # noqa: E402
from pipeline.engine import build_optimizer, build_scheduler, train_one_epoch  # noqa: E402
from pipeline.io import read_json, write_json_atomic  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.params import LossParams, ModelParams, TrainParams, load_params  # noqa: E402
from pipeline.train import fit, worker_config  # noqa: E402


def subset(data: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A prepared dataset holding the first rows of ``data``'s train and val splits."""
    for split, n in (("train", n_train), ("val", n_val)):
        table = shards.read_split(data, split).slice(0, n)
        (out / split).mkdir(parents=True)
        pq.write_table(table, out / split / shards.shard_name(0), row_group_size=shards.ROW_GROUP_ROWS)
    card = read_json(data / paths.CARD_JSON)
    card["splits"]["train"]["images"] = n_train
    write_json_atomic(out / paths.CARD_JSON, card)
    write_json_atomic(out / paths.CLASSES_FILE, read_json(data / paths.CLASSES_FILE))
    return out


def torch_rate(data: Path, cfg: TrainParams, model_cfg: ModelParams, loss_cfg: LossParams) -> float:
    """Images/s of the second epoch of a plain loop over the same rows and transform."""
    config = worker_config(data, cfg, model_cfg, loss_cfg)
    torch.set_num_threads(cfg.threads_per_worker)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, config["num_classes"])
    loss_fn = build_loss(loss_cfg, config["num_classes"], config["ignore_index"], config["class_weights"])
    optimizer = build_optimizer(model, cfg)
    steps = config["n_train"] // cfg.batch_size
    scheduler = build_scheduler(optimizer, cfg, steps)
    table = shards.read_split(data, "train", columns=["image", "mask"])
    images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
    transform = train_transform(cfg.crop_size, cfg.scale_range, cfg.color_jitter, config["ignore_index"])
    norm = {"mean": config["mean"], "std": config["std"], "ignore_index": config["ignore_index"]}
    rate = 0.0
    for _ in range(2):
        batches = (collate(images[i:i + cfg.batch_size], masks[i:i + cfg.batch_size],
                           transform=transform, **norm)
                   for i in range(0, steps * cfg.batch_size, cfg.batch_size))
        stats = train_one_epoch(model, batches, loss_fn, optimizer, scheduler, cfg, torch.device("cpu"))
        rate = stats["images"] / stats["seconds"]
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images instead of 128")
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    args = parser.parse_args()
    cfg = load_params(TrainParams)
    model_cfg = load_params(ModelParams).model_copy(update={"encoder_weights": None})
    loss_cfg = load_params(LossParams)
    n = 32 if args.quick else 128
    cfg = cfg.model_copy(update={"epochs": 2, "num_workers": 1, "warmup_epochs": 0.0,
                                 "threads_per_worker": cfg.threads_per_worker or 2})
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.data, Path(tmp) / "prepared", n, 4)
        before = torch_rate(data, cfg, model_cfg, loss_cfg)
        result, _, _ = fit(data, cfg, model_cfg, loss_cfg, storage=Path(tmp) / "ray", track=False)
        # The last epoch's report (metrics_dataframe holds only the kept checkpoints).
        ray_img_s = float(result.metrics["train_images_per_s"])
        after = torch_rate(data, cfg, model_cfg, loss_cfg)
    torch_img_s = (before + after) / 2
    print(f"{n} images, batch {cfg.batch_size}, crop {cfg.crop_size}, {cfg.threads_per_worker} threads, "
          f"{model_cfg.arch}/{model_cfg.encoder_name}")
    print(f"plain PyTorch loop : {torch_img_s:6.2f} images/s (second epoch; {before:.2f} before, "
          f"{after:.2f} after the Ray run)")
    print(f"Ray Train + Data   : {ray_img_s:6.2f} images/s (second epoch)")
    ratio = ray_img_s / torch_img_s
    print(f"RESULT ray_img_s={ray_img_s:.2f} torch_img_s={torch_img_s:.2f} ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
