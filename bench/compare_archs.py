"""The architectures compared on one wall-clock budget: ``docs/results.md`` from ``dvc exp`` runs.

Each row of ``ROWS`` is trained by ``dvc exp run --temp -n cmp-<row>`` on the repository's
recipe (params.yaml, CamVid by default) with ``train.max_minutes`` as its budget
(``train.epochs`` high enough never to decide), evaluated once at native size without
test-time augmentation, and registered under a model name of its own (the recipe's champion
is left alone). Each finished experiment's scores (its whole evaluation report), the epochs its
MLflow run trained and the minutes they took, and the commit it ran on go into a ledger committed
beside the table (``docs/results-archs.json``): ``dvc exp`` refs and the MLflow store are local
to one clone, the ledger is not, so a comparison interrupted in one clone goes on in another
where it stopped. A row is run again when its model or budget no longer matches its ledger
entry. The table is written from the ledger, with, measured here on the model as built:
parameters, GFLOPs of one forward pass at 360 x 480 (``torch.utils.flop_counter``, a
multiply-add counted as two) and CPU images/s at that size.

    python bench/compare_archs.py                  # every row, 10 minutes each, then the table
    python bench/compare_archs.py --table-only     # the table from the ledger, nothing trained
    python bench/compare_archs.py --refresh        # recorded rows' scores and minutes read again
    python bench/compare_archs.py --quick          # three rows, 1 minute each

The last line is ``RESULT rows=... best=<row> best_miou=...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.budgeted import Experiment, arguments, mapping_sets, read_ledger, run_experiments  # noqa: E402
from bench.results_doc import write_section  # noqa: E402  (the repository is on the path now)

PREFIX = "cmp-"                      # the experiments' names
SIZE = (360, 480)                    # CamVid's frames: GFLOPs and images/s at this size
MOBILENET = {"encoder_name": "mobilenet_v2", "encoder_weights": "imagenet"}
SCRATCH = {"encoder_name": None, "encoder_weights": None}


@dataclass(frozen=True)
class Row:
    name: str                        # the experiment is PREFIX + name
    family: str
    arch: str
    encoder: dict[str, Any] = field(default_factory=lambda: dict(MOBILENET))
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> str:
        name = self.encoder["encoder_name"]
        if name is None:
            return "VGG-16, scratch" if self.arch.startswith(("FCN", "DeepLab")) else "own, scratch"
        return f"{name}{', ImageNet' if self.encoder['encoder_weights'] else ', scratch'}"

    def model(self, classes: int | None = None) -> dict[str, Any]:
        return {"family": self.family, "arch": self.arch, **self.encoder, "in_channels": 3,
                "classes": classes, "kwargs": self.kwargs}


ROWS = (
    Row("unet", "smp", "Unet"), Row("fpn", "smp", "FPN"), Row("deeplabv3plus", "smp", "DeepLabV3Plus"),
    Row("pspnet", "smp", "PSPNet"), Row("linknet", "smp", "Linknet"),
    Row("fcn32s", "seed", "FCN32s"), Row("fcn16s", "seed", "FCN16s"), Row("fcn8s", "seed", "FCN8s"),
    Row("fcn8s-vgg16", "seed", "FCN8s", SCRATCH),
    Row("deeplabv1", "seed", "DeepLabV1"), Row("deeplabv2", "seed", "DeepLabV2"),
    Row("deeplabv1-vgg16", "seed", "DeepLabV1", SCRATCH),
    Row("deeplabv2-jpu", "seed", "DeepLabV2", kwargs={"jpu": True}),
    Row("pointrend", "seed", "PointRend"), Row("gatedscnn", "seed", "GatedSCNN"),
    Row("segnet", "seed", "SegNet", SCRATCH), Row("enet", "seed", "ENet", SCRATCH),
    Row("fcdensenet56", "seed", "FCDenseNet56", SCRATCH),
    Row("fcdensenet67", "seed", "FCDenseNet67", SCRATCH),
    Row("fcdensenet103", "seed", "FCDenseNet103", SCRATCH),
    Row("seed-unet-bilinear", "seed", "UNet", kwargs={"upsampling": "bilinear", "skip_merge": "concat"}),
    Row("seed-unet-transposed-add", "seed", "UNet", kwargs={"upsampling": "transposed", "skip_merge": "add"}),
)
QUICK_ROWS = ("unet", "enet", "fcn8s")


def experiment(row: Row) -> Experiment:
    """The row as a budgeted experiment: its model section set whole."""
    model = {k: v for k, v in row.model().items() if k not in ("classes", "kwargs")}
    sets = [f"model.{k}={v if v is not None else 'null'}" for k, v in model.items()]
    return Experiment(row.name, {"model": row.model()}, (*sets, *mapping_sets("model.kwargs", row.kwargs)))


def overrides(row: Row, minutes: float, model_name: str) -> list[str]:
    """``dvc exp run -S`` arguments: the row's model, the budget, one cheap evaluation."""
    return arguments(experiment(row), minutes, model_name)


def run_rows(rows: list[Row], minutes: float, repo: Path, model_name: str, ledger_path: Path,
             refresh: bool = False) -> None:
    """Runs each row the ledger lacks (or holds for another model or budget), recording each as it
    finishes (``bench/budgeted.py``); ``refresh``: recorded rows' scores read again."""
    run_experiments([experiment(r) for r in rows], minutes, repo, ledger_path, PREFIX, model_name,
                    describe={r.name: f"{r.arch} ({r.backbone})" for r in rows}, refresh=refresh)


def measure(row: Row, classes: int, repeats: int = 7, warmups: int = 3) -> dict[str, float]:
    """Parameters, GFLOPs and CPU images/s of the row's model (random weights) at ``SIZE``: the
    median of ``repeats`` timed passes after ``warmups`` untimed ones (oneDNN picks and caches its
    kernels in the first passes; the median ignores a pass another process interrupted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config.params import ModelParams
    from pipeline.models.registry import build_model

    cfg = ModelParams.model_validate(row.model(classes) | {"encoder_weights": None})
    model = build_model(cfg, classes).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, *SIZE).to(memory_format=torch.channels_last)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        for _ in range(warmups):
            model(x)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            seconds.append(time.perf_counter() - start)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9, "img_s": 1 / statistics.median(seconds)}


def table_rows(rows: list[Row], ledger: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per row the ledger holds for the row's current model: its scores, budget,
    epochs and commit, and ``measure``."""
    out = []
    for row in rows:
        entry = ledger.get(row.name)
        if entry is None or entry.get("model") != row.model():
            continue
        out.append({"row": row, **{k: entry.get(k) for k in ("miou", "boundary_miou", "minutes",
                                                             "trained_minutes", "epochs", "commit")},
                    **measure(row, entry["classes"])})
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        "## Architectures compared on one wall-clock budget",
        "",
        "Written by `python bench/compare_archs.py`: each architecture trained "
        "by `dvc exp run` with the repository's recipe and data (CamVid by default) and a wall-clock "
        "budget (`train.max_minutes`, "
        "training and validation; column budget) on this machine's CPU, then scored on the test "
        "split at native size without test-time augmentation; column commit is the commit each ran on "
        "(rows are recorded in `docs/results-archs.json` as they finish). Parameters, GFLOPs (a "
        "multiply-add is two) and CPU images/s (batch 1, channels-last, all cores, the median of seven "
        f"passes after three warm-ups) are measured on the model at {SIZE[0]} x {SIZE[1]}. Column trained "
        "is the minutes the epochs took: the budget ends training between epochs, so a row whose "
        "first epoch is longer than the budget trains that one epoch whole.",
        "",
        "| architecture | backbone | test mIoU | boundary mIoU | budget (min) | trained (min) | epochs "
        "| parameters (M) | GFLOPs | CPU img/s | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: -(r["miou"] or 0)):
        row: Row = r["row"]
        options = ", ".join(f"{k} {v}" for k, v in row.kwargs.items())
        label = f"{row.arch} ({options})" if options else row.arch
        cells = [label, row.backbone, cell(r["miou"], ".3f"), cell(r["boundary_miou"], ".3f"),
                 cell(r["minutes"], "g"), cell(r.get("trained_minutes"), ".1f"), cell(r["epochs"], "d"),
                 f"{r['params_m']:.2f}",
                 f"{r['gflops']:.1f}", f"{r['img_s']:.2f}", r.get("commit") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Published CamVid test mIoU for context (other budgets, GPUs, full schedules): SegNet 46.4 "
              "and ENet 51.3 (ENet paper, Table 4), BiSeNet 68.7.", ""]
    return "\n".join(lines)


SECTION = "archs"      # its section of docs/results.md (bench/results_doc.py)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="budget per architecture (default 10)")
    all_rows = " ".join(r.name for r in ROWS)
    parser.add_argument("--rows", nargs="*", help=f"row names (default all: {all_rows})")
    parser.add_argument("--quick", action="store_true", help=f"rows {' '.join(QUICK_ROWS)}, 1 minute each")
    parser.add_argument("--table-only", action="store_true",
                        help="no training: the table from the experiments already run")
    parser.add_argument("--refresh", action="store_true",
                        help="read recorded rows' scores (and minutes trained) again from their experiments")
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--ledger", type=Path, default=Path("docs/results-archs.json"),
                        help="the rows recorded so far (relative paths are in --repo)")
    parser.add_argument("--model-name", default="camvid-archs", help="register.model_name of the experiments")
    args = parser.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 10.0)
    names = args.rows or (QUICK_ROWS if args.quick else [r.name for r in ROWS])
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; known: {all_rows}")
    rows = [r for r in ROWS if r.name in names]
    ledger = args.ledger if args.ledger.is_absolute() else args.repo / args.ledger
    if not args.table_only:
        run_rows(rows, minutes, args.repo, args.model_name, ledger, args.refresh)
    results = table_rows(list(ROWS), read_ledger(ledger))      # every row recorded, not only those run now
    out = args.out if args.out.is_absolute() else args.repo / args.out
    write_section(out, SECTION, markdown(results))
    scored = [r for r in results if r["miou"] is not None]
    best = max(scored, key=lambda r: r["miou"]) if scored else None
    print(f"{out}: {len(results)} rows")
    print(f"RESULT rows={len(results)} best={best['row'].name if best else 'none'} "
          f"best_miou={best['miou'] if best else float('nan'):.4f}")
    return {"rows": results, "out": out}


if __name__ == "__main__":
    main()
