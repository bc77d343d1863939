"""Prepared images per second against a plain single-process Pillow decode of the same files.

    python bench/prepare_bench.py [--quick] [--raw data/raw]

Uses CamVid from ``<raw>/camvid`` (or fetches it from $SEG_DATA_MIRROR into a temporary
folder). Both sides handle every image/mask pair of all three splits; the baseline only
decodes (``Image.open(...).load()``), prepare also checks, hashes, counts and writes shards.
Last line: ``RESULT prepared_img_s=... pillow_img_s=... ratio=...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import paths  # noqa: E402
from pipeline.config.params import PrepareParams, load_params  # noqa: E402
from pipeline.data.datasets import list_samples  # noqa: E402
from pipeline.data.sources import CAMVID  # noqa: E402
from pipeline.download import fetch_dataset  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402


def pillow_decode(samples) -> float:
    start = time.perf_counter()
    for s in samples:
        with Image.open(s.image) as im:
            im.load()
        with Image.open(s.mask) as m:
            m.load()
    return len(samples) / (time.perf_counter() - start)


def prepare_rate(raw: Path, cfg: PrepareParams, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepare("camvid", raw, Path(tmp) / "prepared", cfg)
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition instead of three")
    parser.add_argument("--raw", type=Path, default=paths.RAW_DIR)
    args = parser.parse_args()
    cfg = load_params(PrepareParams)
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw / "camvid"
        if not raw.is_dir():
            raw, _ = fetch_dataset(CAMVID, Path(tmp), paths.data_mirror())
        samples = list_samples("camvid", raw, cfg)
        reps = 1 if args.quick else 3
        pillow_decode(samples[:50])                      # warm the page cache and imports
        pil, ours = [], []
        for _ in range(reps):                            # interleaved: same machine state
            pil.append(pillow_decode(samples))
            ours.append(prepare_rate(raw, cfg, len(samples)))
        pil_rate, our_rate = statistics.median(pil), statistics.median(ours)
    print(f"{len(samples)} image/mask pairs, {reps} repetition(s), prepare workers={cfg.workers}")
    print(f"pillow decode : {pil_rate:8.1f} pairs/s  (runs: {', '.join(f'{r:.1f}' for r in pil)})")
    print(f"prepare stage : {our_rate:8.1f} pairs/s  (runs: {', '.join(f'{r:.1f}' for r in ours)})")
    print(f"RESULT prepared_img_s={our_rate:.1f} pillow_img_s={pil_rate:.1f} "
          f"ratio={our_rate / pil_rate:.3f}")


if __name__ == "__main__":
    main()
