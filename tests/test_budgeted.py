"""``bench/budgeted.py``: budgeted ``dvc exp run`` experiments and their ledger."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.budgeted import (
    Experiment,
    arguments,
    current,
    mapping_sets,
    ran_as,
    read_ledger,
    record,
    rescored,
    run_experiments,
)

LOSS = Experiment("dice", {"loss.terms": {"weighted_ce": 0.5, "dice": 0.5}}, ("loss.focal_gamma=2",))


def test_a_mapping_is_replaced_whole_the_way_hydra_takes_it():
    assert mapping_sets("model.kwargs", {}) == ["model.kwargs={}"]
    assert mapping_sets("loss.terms", {"weighted_ce": 0.5, "hausdorff": 0.002}) == [
        "~loss.terms", "+loss.terms={weighted_ce: 0.5, hausdorff: 0.002}"]


def test_the_arguments_add_the_budget_and_a_plain_evaluation():
    args = arguments(LOSS, 2.5, "cmp-model")
    assert args[::2] == ["-S"] * (len(args) // 2)
    sets = args[1::2]
    assert sets[0] == "loss.focal_gamma=2"
    assert {"train.max_minutes=2.5", "train.epochs=10000", "evaluate.flip_tta=false", "evaluate.scales=[1.0]",
            "evaluate.postprocess=none", "register.onnx=false", "register.model_name=cmp-model"} <= set(sets)


def test_an_entry_or_an_experiment_counts_only_for_the_same_params_and_budget():
    entry = {"loss.terms": {"dice": 0.5, "weighted_ce": 0.5}, "minutes": 10}
    assert current(entry, LOSS, 10)
    assert not current(entry, LOSS, 5)
    assert not current({**entry, "loss.terms": {"dice": 1.0}}, LOSS, 10)
    assert not current(None, LOSS, 10)

    def shown(terms, minutes):
        return {"params": {"params.yaml": {"data": {"loss": {"terms": terms, "focal_gamma": 2},
                                                    "train": {"max_minutes": minutes}}}}}
    assert ran_as(shown({"weighted_ce": 0.5, "dice": 0.5}, 10), LOSS, 10)
    # An experiment of the same name that ran with other params is not taken for this one.
    assert not ran_as(shown({"weighted_ce": 1.0}, 10), LOSS, 10)
    assert not ran_as(shown({"weighted_ce": 0.5, "dice": 0.5}, 3), LOSS, 10)
    assert not ran_as({}, LOSS, 10)


def git(repo: Path, *args: str) -> str:
    who = {f"GIT_{role}_{key}": value for role in ("AUTHOR", "COMMITTER")
           for key, value in (("NAME", "t"), ("EMAIL", "t@t"))}
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env=os.environ | who).stdout.strip()


def experiment_repo(tmp_path: Path, report: dict, name: str = "loss-dice") -> tuple[Path, str]:
    """A git + DVC repository whose commit has an experiment ``name`` (a ``refs/exps`` ref, as
    ``dvc exp run`` leaves one) whose DVC-tracked ``evaluation/evaluate.json`` is ``report``;
    the baseline's short sha."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    baseline = git(repo, "rev-parse", "HEAD")
    (repo / "evaluation").mkdir()
    (repo / "evaluation" / "evaluate.json").write_text(json.dumps(report))
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "evaluation"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the experiment")
    git(repo, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", "HEAD")
    git(repo, "reset", "-q", "--hard", baseline)        # the workspace is the baseline again
    shutil.rmtree(repo / "evaluation")                  # (git ignores it): only the DVC cache has it
    return repo, git(repo, "rev-parse", "--short", "HEAD")


REPORT = {"miou": 0.5, "boundary_miou": 0.3, "mean_hd95": 12.5, "mean_asd": 3.25, "eval_key": "8d65",
          "images": 233, "per_class": {"road": {"iou": 0.9}}}


def test_a_record_keeps_every_score_of_the_whole_evaluation_report(tmp_path, monkeypatch):
    """The DVC metrics file holds only the headline; the surface distances (and every other
    number) come from the experiment's own report in the DVC cache."""
    import bench.budgeted as budgeted

    repo, head = experiment_repo(tmp_path, REPORT)
    monkeypatch.setattr(budgeted, "training_figures",
                        lambda name, repo: {"epochs": 7, "trained_minutes": 13.5})
    headline = {"miou": 0.5, "boundary_miou": 0.3, "eval_key": "8d65"}
    data = {"metrics": {"metrics/evaluate.json": {"data": headline}}}
    entry = record(LOSS, "loss-dice", 10, data, repo, 11)
    assert entry["loss.terms"] == LOSS.key["loss.terms"] and entry["commit"] == head
    assert entry["miou"] == 0.5 and entry["epochs"] == 7 and entry["experiment"] == "loss-dice"
    assert entry["trained_minutes"] == 13.5                 # more than the budget: one long epoch
    assert entry["scores"] == {"miou": 0.5, "boundary_miou": 0.3, "mean_hd95": 12.5, "mean_asd": 3.25,
                               "images": 233}


def test_a_record_without_the_experiments_report_fails_naming_it(tmp_path, monkeypatch):
    import bench.budgeted as budgeted

    repo, _ = experiment_repo(tmp_path, REPORT)
    monkeypatch.setattr(budgeted, "training_figures",
                        lambda name, repo: {"epochs": 7, "trained_minutes": 9.5})
    with pytest.raises(RuntimeError, match="no experiment loss-other on commit"):
        record(LOSS, "loss-other", 10, {}, repo, 11)
    cache = repo / ".dvc" / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    with pytest.raises(RuntimeError, match="evaluation/evaluate.json of experiment commit"):
        record(LOSS, "loss-dice", 10, {}, repo, 11)


def test_refresh_reads_a_recorded_rows_scores_again_and_keeps_the_rest(tmp_path, monkeypatch):
    import bench.budgeted as budgeted

    repo, head = experiment_repo(tmp_path, REPORT)
    monkeypatch.setattr(budgeted, "training_figures",
                        lambda name, repo: pytest.fail("no MLflow lookup again"))
    monkeypatch.setattr(budgeted, "dvc", lambda *a, **k: pytest.fail("nothing is trained"))
    monkeypatch.setattr(budgeted, "experiments", lambda repo: {})
    monkeypatch.setattr(budgeted, "num_classes", lambda repo: 11)
    old = {"experiment": "loss-dice", "commit": head, **LOSS.key, "minutes": 10, "classes": 11, "epochs": 7,
           "trained_minutes": 9.8, "recorded": "2026-12-05T03:49:24Z", "miou": 0.5, "boundary_miou": 0.3,
           "scores": {"miou": 0.5, "boundary_miou": 0.3, "fw_iou": 0.7}}
    assert rescored(old, repo) == {**old, "scores": {**old["scores"], "mean_hd95": 12.5, "mean_asd": 3.25,
                                                     "images": 233}}
    assert rescored({**old, "experiment": "loss-gone"}, repo) is None      # not in this clone: as recorded
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"dice": old}))
    run_experiments([LOSS], 10, repo, ledger, "loss-", "m")
    assert json.loads(ledger.read_text())["dice"] == old                  # without refresh: untouched
    run_experiments([LOSS], 10, repo, ledger, "loss-", "m", refresh=True)
    assert json.loads(ledger.read_text())["dice"]["scores"]["mean_hd95"] == 12.5


def test_the_training_figures_are_the_runs_epochs_and_every_epochs_time(tmp_path, monkeypatch):
    """A real MLflow store: epochs from the last planned_epochs, minutes from the training and
    validation seconds of every epoch summed (a one-epoch run longer than its budget shows it)."""
    import mlflow

    from bench.budgeted import training_figures
    from pipeline.config import paths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / paths.MLFLOW_DB}")
    run = client.create_run(client.create_experiment("camvid"), tags={"dvc_exp": "cmp-long"})
    for step, (train_s, val_s, planned) in enumerate([(600.0, 60.0, 2), (420.0, 30.0, 2)]):
        for key, value in (("train_seconds", train_s), ("val_seconds", val_s), ("planned_epochs", planned)):
            client.log_metric(run.info.run_id, key, value, step=step)
    assert training_figures("cmp-long", tmp_path) == {"epochs": 2, "trained_minutes": 18.5}
    assert training_figures("cmp-other", tmp_path) == {"epochs": None, "trained_minutes": None}


def test_refresh_fills_in_the_minutes_trained_of_an_entry_recorded_without_them(tmp_path, monkeypatch):
    """Only the missing figure is read from MLflow: the epochs stay as recorded."""
    import bench.budgeted as budgeted

    repo, head = experiment_repo(tmp_path, REPORT)
    monkeypatch.setattr(budgeted, "training_figures",
                        lambda name, repo: {"epochs": 99, "trained_minutes": 17.25})
    old = {"experiment": "loss-dice", "commit": head, **LOSS.key, "minutes": 10, "classes": 11, "epochs": 1,
           "miou": 0.5, "boundary_miou": 0.3, "scores": {"miou": 0.5, "boundary_miou": 0.3}}
    again = rescored(old, repo)
    assert again["trained_minutes"] == 17.25 and again["epochs"] == 1


def test_a_broken_ledger_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "results-archs.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="results-archs.json: not JSON"):
        read_ledger(path)
    path.write_text("[]")
    with pytest.raises(SystemExit, match="expected an object of rows by name"):
        read_ledger(path)
    assert read_ledger(tmp_path / "missing.json") == {}
