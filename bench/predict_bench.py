"""Peak memory of one tiled prediction of a large image: the band sweep of
``pipeline.inference.predictor`` against the whole-image accumulation it replaced.

    python bench/predict_bench.py            # 6000 x 6000, 11 classes (CamVid), Unet-mobilenet_v2
    python bench/predict_bench.py --quick    # 6000 x 6000, 11 classes, a 1x1-conv model (seconds)

Each way runs in its own fresh process (``--child``): it builds the model, warms up on a
small image, reads ``ru_maxrss``, predicts the mask of a 6000 x 6000 image with 512 x 512
windows (overlap 0.25, serve's defaults) and reads ``ru_maxrss`` again. The baseline is a
copy of the old code: every window's probabilities summed into (C, H, W) float32
(plus the hit counts and the division), then argmax. The last line is
``RESULT key=value ...``: peak RSS of each process, what the prediction added, their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.params import ModelParams  # noqa: E402
from pipeline.inference.predictor import Predictor  # noqa: E402
from pipeline.models.base import ModelMeta, SegmentationModel  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from tests.factories import whole_image_accumulation  # noqa: E402

SIDE = 6000
CLASSES = 11
TILE = (512, 512)
OVERLAP = 0.25


class PixelNet(nn.Module):
    """1x1 convolution: no receptive field, almost no compute: memory is the predictor's own."""

    def __init__(self, classes: int):
        super().__init__()
        self.head = nn.Conv2d(3, classes, 1)
        self.encoder = SimpleNamespace(output_stride=1)

    def forward(self, x):
        return self.head(x)


def make_model(quick: bool) -> SegmentationModel:
    torch.manual_seed(0)
    meta = ModelMeta(tuple(f"c{i}" for i in range(CLASSES)))
    if quick:
        return SegmentationModel(PixelNet(CLASSES), ModelMeta(meta.class_names, mean=(0.5,) * 3,
                                                             std=(0.25,) * 3)).eval()
    cfg = ModelParams.defaults(arch="Unet", encoder_name="mobilenet_v2", encoder_weights=None)
    return build_model(cfg, CLASSES, meta).eval()


def old_mask(model: SegmentationModel, image: np.ndarray) -> np.ndarray:
    """The whole-image accumulation pipeline.inference.predictor used before the band sweep."""
    probs = whole_image_accumulation(model, image, TILE, OVERLAP)
    return (probs / 1).argmax(0).to(torch.uint8).numpy()    # the old probs() divided by len(scales)


def child(way: str, quick: bool) -> None:
    torch.set_num_threads(2)
    model = make_model(quick)
    predictor = Predictor(model, tile_size=TILE, tile_overlap=OVERLAP)
    predict = predictor.mask if way == "band" else (lambda im: old_mask(model, im))
    image = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    predict(np.ascontiguousarray(image[:1100, :1100]))                # warm up (tiled too)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    mask = predict(image)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = int(mask.astype(np.int64).sum())
    print(json.dumps({"peak_mb": peak, "added_mb": peak - before, "seconds": seconds, "digest": digest}))


def run(way: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", way] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x1-conv model: a minute or less")
    parser.add_argument("--child", choices=["band", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    band, whole = run("band", args.quick), run("whole", args.quick)
    model = "pixel1x1" if args.quick else "unet-mobilenet_v2"
    for name, r in (("band sweep", band), ("whole-image accumulation (old)", whole)):
        print(f"{name:32s} peak RSS {r['peak_mb']:7.0f} MB, added by the prediction {r['added_mb']:7.0f} MB, "
              f"{r['seconds']:6.1f} s")
    same = band["digest"] == whole["digest"]
    print(f"RESULT image={SIDE}x{SIDE} classes={CLASSES} model={model} tile={TILE[0]}x{TILE[1]} "
          f"peak_rss_mb={band['peak_mb']:.0f} baseline_peak_rss_mb={whole['peak_mb']:.0f} "
          f"added_mb={band['added_mb']:.0f} baseline_added_mb={whole['added_mb']:.0f} "
          f"ratio={band['peak_mb'] / whole['peak_mb']:.3f} "
          f"added_ratio={band['added_mb'] / whole['added_mb']:.3f} "
          f"seconds={band['seconds']:.1f} baseline_seconds={whole['seconds']:.1f} same_mask_sum={same}")


if __name__ == "__main__":
    main()
