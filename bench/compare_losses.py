"""The losses compared on one wall-clock budget: a section of ``docs/results.md`` from ``dvc exp`` runs.

Each row of the recipe's task (``prepare.task`` in the repository's params.yaml) sets
``loss.terms`` and is trained by ``dvc exp run --temp -n loss-<name>-<row>`` with the same
wall-clock budget (``train.max_minutes``) as the row ``recipe`` (the default recipe's own terms),
then evaluated once at native size without test-time augmentation (``bench/budgeted.py``; rows
are recorded in ``docs/results-losses-<name>.json`` as they finish, so a comparison goes on in
another clone where it stopped). Semantic rows: the recipe (class-weighted CE + Dice), the
distance-penalised CE in place of the weighted CE, sensitivity-specificity in place of Dice, and
the recipe plus Hausdorff (MONAI's distance-transform loss) or Kervadec's surface loss, each
weighted so that its value on an untrained model is about a quarter of the recipe's (measured on
CamVid crops: Hausdorff about 200, surface about 8.5, the recipe about 1.6). Instance rows (Mask
R-CNN): the recipe and the IoU-balanced classification loss in place of the box head's.

    python bench/compare_losses.py --name camvid           # every row, 10 minutes each
    python bench/compare_losses.py --name camvid --table-only
    python bench/compare_losses.py --name camvid --quick   # two rows, 1 minute each
    python bench/compare_losses.py --name nuclei --task instance --table-only   # another recipe's ledger
    python bench/compare_losses.py --name camvid --refresh # recorded rows' scores read again, no training

The last line is ``RESULT name=... rows=... recipe=<score> best=<row> best_score=...``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.budgeted import Experiment, mapping_sets, read_ledger, run_experiments  # noqa: E402
from bench.results_doc import write_section  # noqa: E402


@dataclass(frozen=True)
class Row:
    name: str
    terms: dict[str, float]
    change: str                      # what differs from the recipe, for the table

    def experiment(self) -> Experiment:
        sets = tuple(mapping_sets("loss.terms", self.terms))
        return Experiment(self.name, {"loss.terms": self.terms}, sets)


MASK_RCNN = {"rpn_objectness": 1.0, "rpn_box": 1.0, "classifier": 1.0, "box_reg": 1.0, "mask": 1.0}
ROWS = {
    "semantic": (
        Row("recipe", {"weighted_ce": 0.5, "dice": 0.5}, "the default recipe"),
        Row("distance_ce", {"distance_ce": 0.5, "dice": 0.5},
            "distance-penalised CE in place of weighted CE"),
        Row("sensitivity_specificity", {"weighted_ce": 0.5, "sensitivity_specificity": 0.5},
            "sensitivity-specificity in place of Dice"),
        Row("hausdorff", {"weighted_ce": 0.5, "dice": 0.5, "hausdorff": 0.002}, "+ 0.002 Hausdorff (MONAI)"),
        Row("surface", {"weighted_ce": 0.5, "dice": 0.5, "surface": 0.05}, "+ 0.05 surface (Kervadec)"),
    ),
    "instance": (
        Row("recipe", MASK_RCNN, "the default recipe (Mask R-CNN's losses)"),
        Row("iou_balanced", {**{k: v for k, v in MASK_RCNN.items() if k != "classifier"},
                             "iou_balanced_classifier": 1.0},
            "IoU-balanced classification in place of the box head's CE"),
    ),
}
# The table's score columns per task: (evaluate.json key, heading, format).
COLUMNS = {
    "semantic": (("miou", "test mIoU", ".3f"), ("boundary_miou", "boundary mIoU", ".3f"),
                 ("mean_hd95", "mean HD95 (px)", ".1f"), ("mean_asd", "mean ASD (px)", ".2f")),
    "instance": (("mask_ap", "test mask AP", ".3f"), ("mask_ap50", "mask AP50", ".3f"),
                 ("box_ap", "box AP", ".3f")),
}


def recipe_task(repo: Path) -> str:
    params = repo / "params.yaml"
    task = (yaml.safe_load(params.read_text()) or {}).get("prepare", {}).get("task")
    if task not in ROWS:
        raise SystemExit(f"{params}: prepare.task is {task!r}; the loss comparison has rows for "
                         f"{', '.join(ROWS)}")
    return task


def markdown(name: str, task: str, ledger: dict[str, dict[str, Any]]) -> str:
    """The section: every row the ledger holds for its current terms, the recipe first."""
    columns = COLUMNS[task]
    primary = columns[0][0]
    entries = [(row, ledger[row.name]) for row in ROWS[task]
               if row.name in ledger and ledger[row.name].get("loss.terms") == row.terms]
    base = next((e for row, e in entries if row.name == "recipe"), None)

    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [f"## Losses compared on one wall-clock budget: {name}", "",
             f"Written by `python bench/compare_losses.py --name {name}`: each row's `loss.terms` trained by "
             "`dvc exp run` with the repository's recipe and data and the same wall-clock budget "
             "(`train.max_minutes`, column minutes) on this machine's CPU, then scored on the test split "
             "at native size without test-time augmentation; change is against the recipe's row; rows "
             f"are recorded in `docs/results-losses-{name}.json` as they finish.", "",
             "| row | loss terms | what differs | " + " | ".join(c[1] for c in columns)
             + " | change | minutes | epochs | commit |",
             "|" + "---|" * (len(columns) + 7)]
    for row, entry in entries:
        scores = entry.get("scores") or {}
        score, held = scores.get(primary), (base or {}).get("scores", {}).get(primary)
        change = None if score is None or held is None or row.name == "recipe" else score - held
        terms = " + ".join(f"{w:g} {t}" for t, w in row.terms.items())
        cells = [row.name, terms, row.change, *(cell(scores.get(k), fmt) for k, _, fmt in columns),
                 cell(change, "+.3f"), cell(entry.get("minutes"), "g"), cell(entry.get("epochs"), "d"),
                 entry.get("commit") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the dataset, for the section, ledger and experiments")
    parser.add_argument("--minutes", type=float, default=None, help="budget per row (default 10)")
    parser.add_argument("--rows", nargs="*", help="row names (default: every row of the recipe's task)")
    parser.add_argument("--quick", action="store_true",
                        help="the recipe and the first other row, 1 minute each")
    parser.add_argument("--table-only", action="store_true", help="no training: the table from the ledger")
    parser.add_argument("--refresh", action="store_true",
                        help="read the recorded rows' scores again from their experiments in this clone "
                             "(their evaluation reports); nothing trained for them")
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--ledger", type=Path, default=None,
                        help="default docs/results-losses-<name>.json (relative paths are in --repo)")
    parser.add_argument("--model-name", default=None, help="register.model_name (default <name>-losses)")
    parser.add_argument("--task", choices=sorted(ROWS), default=None,
                        help="the rows' task (default the recipe's prepare.task; with --table-only, the "
                             "task a ledger from another recipe was run with)")
    args = parser.parse_args(argv)
    task = args.task or recipe_task(args.repo)
    if args.task and not args.table_only and args.task != recipe_task(args.repo):
        parser.error(f"--task {args.task}: the recipe's task is {recipe_task(args.repo)}; "
                     "train rows in a clone whose params.yaml is a recipe of that task")
    known = {row.name: row for row in ROWS[task]}
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 10.0)
    names = args.rows or (list(known)[:2] if args.quick else list(known))
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)} for task {task}; known: {' '.join(known)}")
    ledger_path = args.ledger or Path(f"docs/results-losses-{args.name}.json")
    ledger_path = ledger_path if ledger_path.is_absolute() else args.repo / ledger_path
    if not args.table_only:
        rows = [known[n] for n in known if n in names]
        run_experiments([r.experiment() for r in rows], minutes, args.repo, ledger_path,
                        f"loss-{args.name}-", args.model_name or f"{args.name}-losses",
                        describe={r.name: " + ".join(f"{w:g} {t}" for t, w in r.terms.items()) for r in rows},
                        refresh=args.refresh)
    ledger = read_ledger(ledger_path)
    out = args.out if args.out.is_absolute() else args.repo / args.out
    write_section(out, f"losses-{args.name}", markdown(args.name, task, ledger))
    primary = COLUMNS[task][0][0]
    scored = {r.name: ledger[r.name]["scores"][primary] for r in ROWS[task]
              if ledger.get(r.name, {}).get("loss.terms") == r.terms
              and (ledger[r.name].get("scores") or {}).get(primary) is not None}
    best = max(scored, key=scored.get) if scored else None
    print(f"{out}: {len(scored)} rows")
    print(f"RESULT name={args.name} rows={len(scored)} recipe={scored.get('recipe', float('nan')):.4f} "
          f"best={best or 'none'} best_score={scored[best] if best else float('nan'):.4f}")
    return {"scores": scored, "out": out}


if __name__ == "__main__":
    main()
