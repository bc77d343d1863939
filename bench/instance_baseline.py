"""Instance quality: a plain PyTorch loop over torchvision's Mask R-CNN, the baseline the
pipeline's instance training must not fall below.

    python bench/instance_baseline.py --data <prepared DSB 2018> [--params recipes/dsb2018.yaml]
        [--pipeline evaluation/evaluate.json] [--quick]

What a user would write by hand, with the same model (the params' model section: the same
network, weights and image scale), the same budget (``train.epochs`` over the same training
images, batches of the pipeline's global batch, ``num_workers x threads_per_worker``
threads in one process), the same augmentation and optimiser settings: no Ray, no MLflow,
no checkpoints, no validation, the last epoch's weights. Then the test split is scored
exactly as the evaluate stage scores it (whole images, COCO mask AP over IoU 0.50:0.95,
AP50, the DSB 2018 score). ``--pipeline`` reads a pipeline run's evaluation report to print
the differences. Last line: ``RESULT plain_mask_ap=... plain_mask_ap50=... plain_dsb=...
plain_minutes=...`` (and ``pipeline_*``, ``ap_gain`` with ``--pipeline``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.config import paths  # noqa: E402
from pipeline.config.params import ModelParams, TrainParams, load_params  # noqa: E402
from pipeline.data import instance_batches, shards  # noqa: E402
from pipeline.inference.instances import InstancePredictor  # noqa: E402
from pipeline.metrics.instance import coco_ap, dsb_score  # noqa: E402
from pipeline.models.base import ModelMeta  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.utils.io import read_json  # noqa: E402


def train_plain(data: Path, cfg: TrainParams, model_cfg: ModelParams, epochs: int):
    """The hand-written loop; returns (model, seconds)."""
    classes = read_json(data / paths.CLASSES_FILE)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_workers * (cfg.threads_per_worker or 1))
    meta = ModelMeta(class_names=classes["names"], task="instance")
    model = build_model(model_cfg, classes["num_classes"], meta)
    mean, std = model.meta.mean, model.meta.std
    table = shards.read_split(data, "train", columns=["image", "instances"])
    images, targets = table.column("image").to_pylist(), table.column("instances").to_pylist()
    batch = cfg.batch_size * cfg.num_workers
    steps_per_epoch = max(1, len(images) // batch)
    total, warmup = epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    def factor(step: int) -> float:        # linear warm-up, then cosine, per step (as the pipeline's)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    transform = instance_batches.train_transform(cfg.crop_size, cfg.scale_range, cfg.color_jitter)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        transform.set_random_seed(cfg.seed + epoch)
        order = torch.randperm(len(images), generator=generator).tolist()
        for s in range(steps_per_epoch):
            rows = order[s * batch:(s + 1) * batch]
            x, y = instance_batches.collate([images[i] for i in rows], [targets[i] for i in rows], mean=mean,
                                            std=std, ignore_index=255, transform=transform)
            loss = sum(model(x, y).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            schedule.step()
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {elapsed:.0f} s", flush=True)
    return model.eval(), time.perf_counter() - start


def score(model, data: Path, split: str) -> dict[str, float]:
    """The evaluate stage's scores of ``split``: whole images, no tiles or TTA."""
    names = read_json(data / paths.CLASSES_FILE)["names"]
    predictor = InstancePredictor.for_model(model, flip_tta=False, scales=(1.0,), tile_above_pixels=10**9)
    truth, predicted = [], []
    for _, image, t in shards.iter_instance_samples(data, split):
        truth.append(t)
        predicted.append(predictor.instances([image])[0])
    ap = coco_ap(truth, predicted, names, "segm")
    return {"mask_ap": ap["ap"], "mask_ap50": ap["ap50"], "dsb_score": dsb_score(truth, predicted),
            "images": len(truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared instance dataset")
    parser.add_argument("--params", type=Path, default=Path("recipes/dsb2018.yaml"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--pipeline", type=Path, help="a pipeline run's evaluation/evaluate.json")
    parser.add_argument("--quick", action="store_true", help="one epoch")
    args = parser.parse_args()
    cfg = load_params(TrainParams, args.params)
    model_cfg = load_params(ModelParams, args.params)
    epochs = 1 if args.quick else cfg.epochs
    model, seconds = train_plain(args.data, cfg, model_cfg, epochs)
    plain = score(model, args.data, args.split)
    print(f"plain loop: {epochs} epochs in {seconds / 60:.1f} min; {args.split} ({plain['images']} images): "
          f"mask AP {plain['mask_ap']:.4f}, AP50 {plain['mask_ap50']:.4f}, DSB {plain['dsb_score']:.4f}")
    line = (f"RESULT plain_mask_ap={plain['mask_ap']:.4f} plain_mask_ap50={plain['mask_ap50']:.4f} "
            f"plain_dsb={plain['dsb_score']:.4f} plain_minutes={seconds / 60:.1f}")
    if args.pipeline:
        run = read_json(args.pipeline)
        line += (f" pipeline_mask_ap={run['mask_ap']:.4f} pipeline_mask_ap50={run['mask_ap50']:.4f} "
                 f"pipeline_dsb={run['dsb_score']:.4f} ap_gain={run['mask_ap'] - plain['mask_ap']:+.4f}")
    print(line)


if __name__ == "__main__":
    main()
