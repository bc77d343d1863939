"""What refining with the image buys: one model evaluated without refinement and with each
refinement its task takes (``evaluate.postprocess``: the dense CRF, GrabCut), on one split, in
one run.

    python bench/refine_bench.py --model models/train --data data/prepared --name camvid
    python bench/refine_bench.py --model models:/camvid-unet@champion --name camvid --quick

Each way is the evaluate stage's own scoring (``pipeline.evaluate.evaluate_split`` and the
task's report) with the repository's evaluate settings, except no flip or multi-scale TTA (so
that the refinement alone differs), and the methods' parameters from params.yaml
(``evaluate.crf``, ``evaluate.grabcut``). Measured: the task's primary score (test mIoU, or
mask AP for instances), boundary mIoU where the task has it, and milliseconds per image
(prediction, refinement and scoring), each refinement against no refinement measured in the
same run. ``--quick`` scores the validation split. The table goes into ``docs/results.md`` as
section ``refine-<name>``; the last line is ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_doc import write_section  # noqa: E402
from pipeline.config import paths  # noqa: E402
from pipeline.config.params import EvaluateParams, load_params  # noqa: E402
from pipeline.evaluate import evaluate_split  # noqa: E402
from pipeline.tasks import task_of_model  # noqa: E402

METHODS = {"semantic": ("none", "crf", "grabcut"), "instance": ("none", "grabcut")}


def load(spec: str):
    """A saved model folder, or a ``models:/`` / ``runs:/`` URI of a logged one."""
    if spec.startswith(("models:/", "runs:/")):
        from pipeline.serving.service import load_segmentation_model

        return load_segmentation_model(spec)
    from pipeline.artifacts.model_dir import load_model

    return load_model(Path(spec))


def methods_for(task_name: str, classes: int) -> tuple[str, ...]:
    """The refinements a model takes: GrabCut needs two classes (or instances)."""
    methods = METHODS.get(task_name, ("none",))
    return tuple(m for m in methods if m != "grabcut" or task_name == "instance" or classes == 2)


def measure(model, data: Path, cfg: EvaluateParams) -> dict[str, Any]:
    task = task_of_model(model)
    start = time.perf_counter()
    ev = evaluate_split(model, data, cfg, task)
    seconds = time.perf_counter() - start
    report = task.report(ev)
    return {"score": report.get(task.primary_metric), "boundary_miou": report.get("boundary_miou"),
            "images": report.get("images"), "ms": 1000 * seconds / max(1, report.get("images") or 1)}


def markdown(name: str, split: str, label: str, rows: dict[str, dict[str, Any]]) -> str:
    base = rows["none"]

    def cell(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [f"## Refinement with the image: {name}", "",
             f"Written by `python bench/refine_bench.py --name {name}`: the same model on the {split} split "
             f"({base['images']} images), without test-time augmentation, without refinement and with each "
             "refinement its task takes (parameters from params.yaml's `evaluate.crf` and "
             "`evaluate.grabcut`); ms per image covers prediction, refinement and scoring.", "",
             f"| postprocess | {label} | change | boundary mIoU | ms / image | time ratio |",
             "|---|---|---|---|---|---|"]
    for method, r in rows.items():
        change = None if r["score"] is None or base["score"] is None else r["score"] - base["score"]
        lines.append(f"| {method} | {cell(r['score'], '.4f')} | {cell(change, '+.4f')} | "
                     f"{cell(r['boundary_miou'], '.4f')} | {r['ms']:.0f} | {r['ms'] / base['ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(paths.TRAIN_OUT), help="a model folder or a models:/ URI")
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    parser.add_argument("--name", required=True, help="the dataset, for the section's title")
    parser.add_argument("--methods", nargs="*", help="default: every refinement the model's task takes")
    parser.add_argument("--quick", action="store_true", help="the validation split")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = parser.parse_args(argv)
    model = load(args.model)
    task = task_of_model(model)
    methods = args.methods or methods_for(task.name, len(model.meta.class_names))
    if "none" not in methods:
        methods = ("none", *methods)
    base = load_params(EvaluateParams, args.params)
    split = "val" if args.quick else base.split
    rows = {}
    for method in methods:
        plain = {"split": split, "flip_tta": False, "scales": (1.0,), "postprocess": method}
        rows[method] = row = measure(model, args.data, base.model_copy(update=plain))
        print(f"{method}: {task.primary_label} {row['score']:.4f}, {row['ms']:.0f} ms/image", flush=True)
    write_section(args.out, f"refine-{args.name}", markdown(args.name, split, task.primary_label, rows))
    figures = " ".join(f"{m}_score={r['score']:.4f} {m}_ms={r['ms']:.0f}" for m, r in rows.items())
    print(f"RESULT name={args.name} split={split} {figures}")
    return rows


if __name__ == "__main__":
    main()
