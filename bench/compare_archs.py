"""The architectures compared on one wall-clock budget: ``docs/results.md`` from ``dvc exp`` runs.

Each row of ``ROWS`` is trained by ``dvc exp run --temp -n cmp-<row>`` on the repository's
recipe (params.yaml, CamVid by default) with ``train.max_minutes`` as its budget
(``train.epochs`` high enough never to decide), evaluated once at native size without
test-time augmentation, and registered under a model name of its own (the recipe's champion
is left alone). Each finished experiment's test mIoU and boundary mIoU (``metrics/evaluate.
json``), the epochs its MLflow run trained and the commit it ran on go into a ledger committed
beside the table (``docs/results-archs.json``): ``dvc exp`` refs and the MLflow store are local
to one clone, the ledger is not, so a comparison interrupted in one clone goes on in another
where it stopped. A row is run again when its model or budget no longer matches its ledger
entry. The table is written from the ledger, with, measured here on the model as built:
parameters, GFLOPs of one forward pass at 360 x 480 (``torch.utils.flop_counter``, a
multiply-add counted as two) and CPU images/s at that size.

    python bench/compare_archs.py                  # every row, 10 minutes each, then the table
    python bench/compare_archs.py --table-only     # the table from the ledger, nothing trained
    python bench/compare_archs.py --quick          # three rows, 1 minute each

The last line is ``RESULT rows=... best=<row> best_miou=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.results_doc import write_section  # noqa: E402  (the repository is on the path now)
from pipeline.utils.io import write_json_atomic  # noqa: E402

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


def overrides(row: Row, minutes: float, model_name: str) -> list[str]:
    """``dvc exp run -S`` arguments: the row's model, the budget, one cheap evaluation. A mapping
    with keys is replaced by deleting and adding it (Hydra refuses new keys in an assignment)."""
    model = {k: v for k, v in row.model().items() if k not in ("classes", "kwargs")}
    sets = [f"model.{k}={v if v is not None else 'null'}" for k, v in model.items()]
    if row.kwargs:
        mapping = ", ".join(f"{k}: {json.dumps(v)}" for k, v in row.kwargs.items())
        sets += ["~model.kwargs", f"+model.kwargs={{{mapping}}}"]
    else:
        sets.append("model.kwargs={}")
    sets += [f"train.max_minutes={minutes:g}", "train.epochs=10000",
             "evaluate.flip_tta=false", "evaluate.scales=[1.0]",
             "register.onnx=false", f"register.model_name={model_name}"]
    return [arg for s in sets for arg in ("-S", s)]


def dvc(*args: str, repo: Path) -> str:
    # The stages run `python`: this interpreter's, whether or not its environment is activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                          env=os.environ | {"DVC_NO_ANALYTICS": "1", "PATH": path})
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """``dvc exp show``'s experiments of the current commit by name: their params and metrics."""
    shown = json.loads(dvc("exp", "show", "--json", repo=repo))
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name") and rev.get("data"):
                    found[rev["name"]] = rev["data"]
    return found


def read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not JSON ({err}); restore it from git or delete it") from None
    if not isinstance(ledger, dict):
        raise SystemExit(f"{path}: expected an object of rows by name, got {type(ledger).__name__}")
    return ledger


def current(entry: dict[str, Any] | None, row: Row, minutes: float) -> bool:
    """Whether a ledger entry was trained with the row's model and this budget."""
    return entry is not None and entry.get("model") == row.model() and entry.get("minutes") == minutes


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()


def num_classes(repo: Path) -> int:
    """The prepared data's class count; prepares the data in the workspace first when it is not
    there (the experiments then start from it instead of each preparing it again)."""
    classes = repo / "data/prepared/classes.json"
    if not classes.exists():
        print("data/prepared: missing, dvc repro prepare", flush=True)
        dvc("repro", "prepare", repo=repo)
    return json.loads(classes.read_text())["num_classes"]


def record(row: Row, minutes: float, data: dict[str, Any], repo: Path, classes: int) -> dict[str, Any]:
    """The ledger entry of a finished experiment, from ``dvc exp show``'s data and its MLflow run."""
    evaluation = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
    return {"experiment": PREFIX + row.name, "commit": git_head(repo), "model": row.model(),
            "minutes": minutes, "classes": classes, "miou": evaluation.get("miou"),
            "boundary_miou": evaluation.get("boundary_miou"),
            "epochs": epochs_trained(PREFIX + row.name, repo),
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_rows(rows: list[Row], minutes: float, repo: Path, model_name: str, ledger_path: Path) -> None:
    """Runs each row the ledger lacks (or holds for another model or budget), recording each as it
    finishes; an experiment of this commit already run is recorded without training again."""
    ledger = read_ledger(ledger_path)
    classes = num_classes(repo)
    done = experiments(repo)
    for row in rows:
        name = PREFIX + row.name
        if current(ledger.get(row.name), row, minutes):
            print(f"{name}: in the ledger (commit {ledger[row.name]['commit']})", flush=True)
            continue
        if name in done and done[name].get("params", {}).get("params.yaml", {}).get("data", {}).get(
                "train", {}).get("max_minutes") == minutes:
            print(f"{name}: already run", flush=True)
        else:
            if name in done:                       # another budget: dvc refuses a name twice
                dvc("exp", "remove", name, repo=repo)
            start = time.monotonic()
            print(f"{name}: training {row.arch} ({row.backbone}) for {minutes:g} minutes", flush=True)
            dvc("exp", "run", "--temp", "-n", name, *overrides(row, minutes, model_name), repo=repo)
            print(f"{name}: done in {(time.monotonic() - start) / 60:.1f} minutes", flush=True)
            done = experiments(repo)
        ledger[row.name] = record(row, minutes, done[name], repo, classes)
        write_json_atomic(ledger_path, ledger)


def epochs_trained(exp_name: str, repo: Path) -> int | None:
    """The epochs the experiment's MLflow run trained (its last ``planned_epochs``), from
    ``$MLFLOW_TRACKING_URI`` or the repository's embedded store."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import paths

    embedded = f"sqlite:///{(repo / paths.MLFLOW_DB).resolve()}"
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or embedded
    client = MlflowClient(uri)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], f"tags.dvc_exp = '{exp_name}'"):
            if "planned_epochs" in run.data.metrics:
                return int(run.data.metrics["planned_epochs"])
    return None


def measure(row: Row, classes: int, repeats: int = 5) -> dict[str, float]:
    """Parameters, GFLOPs and CPU images/s of the row's model (random weights) at ``SIZE``."""
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
        model(x)                                   # warm
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        seconds = (time.perf_counter() - start) / repeats
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9, "img_s": 1 / seconds}


def table_rows(rows: list[Row], ledger: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per row the ledger holds for the row's current model: its scores, budget,
    epochs and commit, and ``measure``."""
    out = []
    for row in rows:
        entry = ledger.get(row.name)
        if entry is None or entry.get("model") != row.model():
            continue
        out.append({"row": row, **{k: entry.get(k) for k in ("miou", "boundary_miou", "minutes", "epochs",
                                                             "commit")},
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
        "training and validation; column minutes) on this machine's CPU, then scored on the test "
        "split at native size without test-time augmentation; column commit is the commit each ran on "
        "(rows are recorded in `docs/results-archs.json` as they finish). Parameters, GFLOPs (a "
        "multiply-add is two) and CPU images/s (batch 1, channels-last) are measured on the model at "
        f"{SIZE[0]} x {SIZE[1]}.",
        "",
        "| architecture | backbone | test mIoU | boundary mIoU | minutes | epochs | parameters (M) | GFLOPs "
        "| CPU img/s | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: -(r["miou"] or 0)):
        row: Row = r["row"]
        options = ", ".join(f"{k} {v}" for k, v in row.kwargs.items())
        label = f"{row.arch} ({options})" if options else row.arch
        cells = [label, row.backbone, cell(r["miou"], ".3f"), cell(r["boundary_miou"], ".3f"),
                 cell(r["minutes"], "g"), cell(r["epochs"], "d"), f"{r['params_m']:.2f}",
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
        run_rows(rows, minutes, args.repo, args.model_name, ledger)
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
