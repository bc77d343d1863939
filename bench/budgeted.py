"""Budgeted ``dvc exp run`` experiments and the ledger that records them, for the comparison
benchmarks (``bench/compare_archs.py``, ``bench/compare_losses.py``).

An ``Experiment`` is a name, the params it sets (``key``: dotted params path -> value, e.g.
``{"model": {...}}`` or ``{"loss.terms": {...}}``) and the ``dvc exp run -S`` assignments that set
them. ``run_experiments`` trains each one the ledger lacks with ``train.max_minutes`` as its budget,
evaluates it once at native size without test-time augmentation, registers it under a model name
of its own (the recipe's champion is left alone) and records it in the ledger as it finishes: the
experiment's evaluation scores, the epochs its MLflow run trained and the minutes they took (a
first epoch longer than the budget still runs whole), and the commit it ran on. The
scores are those of the whole evaluation report
(``evaluation/evaluate.json``, read from the experiment's outputs in the DVC cache), which holds
more than the DVC metrics file's headline (the semantic task's surface distances, for one).
``dvc exp`` refs and the MLflow store are local to one clone, the ledger (a
committed JSON file) is not, so a comparison interrupted in one clone goes on in another where it
stopped. An entry counts only for the same params and budget; an experiment is run again when
either changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.utils.io import write_json_atomic


@dataclass(frozen=True)
class Experiment:
    name: str                        # the ledger's key; the experiment is called prefix + name
    key: dict[str, Any]              # dotted params path -> the value the experiment sets there
    sets: tuple[str, ...]            # its ``-S`` assignments (the budget's are added)


def mapping_sets(path: str, mapping: dict[str, Any]) -> list[str]:
    """Assignments replacing the mapping at ``path`` whole: deleted and added again, since Hydra
    refuses a new key in a plain assignment."""
    if not mapping:
        return [f"{path}={{}}"]
    body = ", ".join(f"{k}: {json.dumps(v)}" for k, v in mapping.items())
    return [f"~{path}", f"+{path}={{{body}}}"]


def budget_sets(minutes: float, model_name: str) -> list[str]:
    """The budget (``train.epochs`` high enough never to decide), one plain evaluation, and a
    registered model name of the comparison's own."""
    return [f"train.max_minutes={minutes:g}", "train.epochs=10000", "evaluate.flip_tta=false",
            "evaluate.scales=[1.0]", "evaluate.postprocess=none", "register.onnx=false",
            f"register.model_name={model_name}"]


def arguments(experiment: Experiment, minutes: float, model_name: str) -> list[str]:
    """``dvc exp run`` arguments: ``-S`` before each assignment."""
    sets = [*experiment.sets, *budget_sets(minutes, model_name)]
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


def current(entry: dict[str, Any] | None, experiment: Experiment, minutes: float) -> bool:
    """Whether a ledger entry was trained with the experiment's params and this budget."""
    return (entry is not None and entry.get("minutes") == minutes
            and all(entry.get(path) == value for path, value in experiment.key.items()))


def lookup(params: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a params mapping (None where it is missing)."""
    value: Any = params
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def ran_as(data: dict[str, Any], experiment: Experiment, minutes: float) -> bool:
    """Whether an experiment ``dvc exp show`` lists ran with these params and this budget."""
    params = data.get("params", {}).get("params.yaml", {}).get("data", {})
    return (lookup(params, "train.max_minutes") == minutes
            and all(lookup(params, path) == value for path, value in experiment.key.items()))


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


def training_figures(exp_name: str, repo: Path) -> dict[str, Any]:
    """``epochs``: the epochs the experiment's MLflow run trained (its last ``planned_epochs``);
    ``trained_minutes``: their training and validation time (``train_seconds`` + ``val_seconds``
    over every epoch), which exceeds the budget where one epoch does. From
    ``$MLFLOW_TRACKING_URI`` or the repository's embedded store; None for what the run lacks."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import paths

    embedded = f"sqlite:///{(repo / paths.MLFLOW_DB).resolve()}"
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or embedded
    client = MlflowClient(uri)
    for mlflow_experiment in client.search_experiments():
        for run in client.search_runs([mlflow_experiment.experiment_id], f"tags.dvc_exp = '{exp_name}'"):
            if "planned_epochs" in run.data.metrics:
                seconds = [m.value for key in ("train_seconds", "val_seconds")
                           for m in client.get_metric_history(run.info.run_id, key)]
                return {"epochs": int(run.data.metrics["planned_epochs"]),
                        "trained_minutes": sum(seconds) / 60 if seconds else None}
    return {"epochs": None, "trained_minutes": None}


def experiment_rev(repo: Path, baseline: str, exp_name: str) -> str | None:
    """The commit of experiment ``exp_name`` run on ``baseline`` (a commit), None where this clone
    has no such experiment (its ref ``refs/exps/<baseline's sha[:2]>/<sha[2:]>/<name>``)."""
    def git(*args: str) -> str:          # '' where git finds no such revision
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--verify", "--quiet", f"{baseline}^{{commit}}") if baseline else ""
    if not sha or not exp_name:
        return None
    return git("rev-parse", "--verify", "--quiet", f"refs/exps/{sha[:2]}/{sha[2:]}/{exp_name}") or None


def report_scores(repo: Path, rev: str) -> dict[str, Any]:
    """Every number of the whole evaluation report that the experiment commit ``rev`` produced
    (its ``evaluation/evaluate.json``, from the DVC cache)."""
    import dvc.api

    from pipeline.config import paths

    path = paths.EVAL_REPORT.as_posix()
    try:
        report = json.loads(dvc.api.read(path, repo=str(repo), rev=rev))
    except Exception as err:  # noqa: BLE001 - the message names what is missing, whatever dvc raised
        raise RuntimeError(f"{repo}: the evaluation report {path} of experiment commit {rev} cannot be "
                           f"read from the DVC cache ({type(err).__name__}: {err})") from err
    return {k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def record(experiment: Experiment, exp_name: str, minutes: float, data: dict[str, Any], repo: Path,
           classes: int) -> dict[str, Any]:
    """The ledger entry of a finished experiment of the current commit, from ``dvc exp show``'s
    data, its evaluation report and its MLflow run: every number of its evaluation (``scores``;
    test mIoU and boundary mIoU also on their own)."""
    evaluation = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
    scores = {k: v for k, v in evaluation.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    commit = git_head(repo)
    rev = experiment_rev(repo, commit, exp_name)
    if rev is None:
        raise RuntimeError(f"{repo}: no experiment {exp_name} on commit {commit} (dvc exp show listed it)")
    entry = {"experiment": exp_name, "commit": commit, **experiment.key, "minutes": minutes,
             "classes": classes, **training_figures(exp_name, repo),
             "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return with_scores(entry, scores | report_scores(repo, rev))


def with_scores(entry: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "miou": scores.get("miou"), "boundary_miou": scores.get("boundary_miou"),
            "scores": scores}


def rescored(entry: dict[str, Any], repo: Path) -> dict[str, Any] | None:
    """A ledger entry with its scores read again from its experiment's evaluation report (the
    commit, epochs and budget as recorded; the minutes trained filled in from its MLflow run where
    the entry predates them); None where this clone lacks the experiment."""
    rev = experiment_rev(repo, entry.get("commit") or "", entry.get("experiment") or "")
    if rev is None:
        return None
    if "trained_minutes" not in entry:
        entry = {**entry, "trained_minutes": training_figures(entry["experiment"], repo)["trained_minutes"]}
    return with_scores(entry, (entry.get("scores") or {}) | report_scores(repo, rev))


def run_experiments(todo: list[Experiment], minutes: float, repo: Path, ledger_path: Path, prefix: str,
                    model_name: str, describe: dict[str, str] | None = None, refresh: bool = False) -> None:
    """Runs each experiment the ledger lacks (or holds for other params or another budget),
    recording each as it finishes; one of this commit already run with the same params and budget
    is recorded without training again. ``describe``: a label per name for the log. ``refresh``:
    the scores of entries already in the ledger are read again from their experiments' reports
    (where this clone has them), nothing trained for them."""
    ledger = read_ledger(ledger_path)
    classes = num_classes(repo)
    done = experiments(repo)
    for experiment in todo:
        name = prefix + experiment.name
        if current(ledger.get(experiment.name), experiment, minutes):
            entry = ledger[experiment.name]
            again = rescored(entry, repo) if refresh else None
            if again is not None:
                ledger[experiment.name] = again
                write_json_atomic(ledger_path, ledger)
            said = "" if not refresh else ", scores read again" if again else ", no experiment here to read"
            print(f"{name}: in the ledger (commit {entry['commit']}){said}", flush=True)
            continue
        if name in done and ran_as(done[name], experiment, minutes):
            print(f"{name}: already run", flush=True)
        else:
            if name in done:                       # other params or budget: dvc refuses a name twice
                dvc("exp", "remove", name, repo=repo)
            start = time.monotonic()
            label = (describe or {}).get(experiment.name, experiment.name)
            print(f"{name}: training {label} for {minutes:g} minutes", flush=True)
            dvc("exp", "run", "--temp", "-n", name, *arguments(experiment, minutes, model_name), repo=repo)
            print(f"{name}: done in {(time.monotonic() - start) / 60:.1f} minutes", flush=True)
            done = experiments(repo)
        ledger[experiment.name] = record(experiment, name, minutes, done[name], repo, classes)
        write_json_atomic(ledger_path, ledger)
