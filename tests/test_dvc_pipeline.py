"""The real DVC pipeline of this repository, run in a scratch copy on a tiny user folder.

Checks the wiring of dvc.yaml and data.dvc: download -> prepare runs, a second
``dvc repro prepare`` is a no-op, and ``dvc push`` / ``dvc pull`` to a local remote
restore exactly the raw bytes and the prepared data.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.artifacts import records
from tests.factories import make_colour_coded_dataset, make_folder_dataset, repo_params, tiny_model

REPO = Path(__file__).resolve().parents[1]


def dvc(repo: Path, *args: str, env: dict, stdout_only: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def scratch_repo(tmp_path: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", repo / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore", ".gitignore", "data/.gitignore",
                 "models/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
        "PYTHONPATH": str(repo),
    }
    env.pop("SEG_DATA_MIRROR", None)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q", env=env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    dvc(repo, "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"), env=env)
    return repo, env


def tiny_pipeline_repo(tmp_path: Path, crop: int = 32, **sections: dict) -> tuple[Path, dict]:
    """``scratch_repo`` on 20 tiny colour-coded images: a 2-epoch resnet18 recipe registered as
    ``tiny``, each of ``sections`` merged into its params section; a local Ray cluster without
    auth and the embedded MLflow store."""
    repo, env = scratch_repo(tmp_path)
    env = env | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    make_colour_coded_dataset(tmp_path / "user", n=20)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"] |= {"dataset": "folder", "folder": str(tmp_path / "user")}
    params["prepare"] |= {"classes": ["background", "road", "car"], "workers": 1, "test_fraction": 0.2}
    params["model"] |= {"encoder_name": "resnet18", "encoder_weights": None}
    params["train"] |= {"epochs": 2, "batch_size": 4, "crop_size": [crop, crop], "warmup_epochs": 0.2,
                        "threads_per_worker": 1}
    params["evaluate"]["overlays"] = {"samples": 2, "worst_per_class": 1}
    params["register"] |= {"model_name": "tiny"}
    for name, values in sections.items():
        params[name] |= values
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    return repo, env


def test_repro_is_cached_and_push_pull_restores_the_raw_bytes(tmp_path):
    repo, env = scratch_repo(tmp_path)
    make_folder_dataset(tmp_path / "user", n=12, binary_255=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"] |= {"dataset": "folder", "folder": str(tmp_path / "user")}
    params["prepare"] |= {"classes": ["background", "object"], "workers": 1}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    # The data stages only: training has tests of its own (tests/test_train*.py).
    dvc(repo, "repro", "prepare", env=env)
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert sum(s["images"] for s in card["splits"].values()) == 12
    assert card["problems"]["warnings"] == 1          # the 0/255 masks were recognised

    start = time.monotonic()
    out = dvc(repo, "repro", "prepare", env=env)
    assert "Data and pipelines are up to date" in out
    assert time.monotonic() - start < 5

    # Version the raw area the run used, push everything, lose it, pull it back.
    dvc(repo, "commit", "--force", "data.dvc", env=env)
    assert "nfiles: 24" in (repo / "data.dvc").read_text()
    raw_before = digests(repo / "data/raw")
    prepared_before = digests(repo / "data/prepared")
    dvc(repo, "push", "data.dvc", "prepare", env=env)
    for path in ("data/raw", "data/prepared", ".dvc/cache"):
        shutil.rmtree(repo / path)
    dvc(repo, "pull", "data.dvc", "prepare", env=env)
    assert digests(repo / "data/raw") == raw_before
    assert digests(repo / "data/prepared") == prepared_before
    assert "up to date" in dvc(repo, "status", "data.dvc", "prepare", env=env)


@pytest.mark.slow
def test_whole_pipeline_then_an_experiment_each_in_its_own_mlflow_run(tmp_path):
    """download -> ... -> register on tiny colour-coded data, a no-op re-run, then
    ``dvc exp run -S``: a second MLflow run named after the experiment, gated like any."""
    repo, env = tiny_pipeline_repo(tmp_path, loss={"terms": {"ce": 0.5, "dice": 0.5}})

    out = dvc(repo, "repro", env=env)
    assert "test: mIoU " in out                       # the evaluate stage's headline line (task labels)
    decision = json.loads((repo / "models/registry.json").read_text())
    assert decision["promoted"] and decision["reason"] == "no champion yet" and decision["onnx_uri"]
    assert json.loads((repo / "evaluation/index.json").read_text())["samples"]
    start = time.monotonic()
    assert "Data and pipelines are up to date" in dvc(repo, "repro", env=env)
    assert time.monotonic() - start < 5
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")

    def runs():
        return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]

    # An edit to code the training runs re-runs train, and it trains afresh: a new Ray run and
    # MLflow run, not the finished one restored with its old weights.
    (first,) = runs()
    with (repo / "pipeline/losses/terms.py").open("a") as f:
        f.write("# an edit that dvc.yaml sees\n")
    dvc(repo, "repro", env=env)
    (second,) = [r for r in runs() if r.info.run_id != first.info.run_id]
    assert second.data.tags["ray_run_name"] != first.data.tags["ray_run_name"]
    assert second.data.metrics["best_val_miou"] >= 0
    assert records.run_records(second.data.metrics, second.data.tags)       # evaluated: one record

    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=env)
    # README, "Experiments": `~` drops the terms and `+` sets the new ones; a plain
    # `loss.terms={...}` fails on a new key and `++` merges it into the old terms.
    dvc(repo, "exp", "run", "-S", "train.epochs=3", "-S", "~loss.terms", "-S", "+loss.terms={focal: 1.0}",
        "-n", "three-epochs", env=env)
    assert "three-epochs" in dvc(repo, "exp", "show", "--json", env=env)
    assert "miou" in dvc(repo, "metrics", "diff", env=env)
    plots = json.loads(dvc(repo, "plots", "diff", "HEAD", "--json", env=env, stdout_only=True))
    assert {"metrics/plots/evaluate/per_class.json", "metrics/plots/evaluate/confusion.json",
            "metrics/plots/train/val_iou.json"} <= set(plots["data"])

    assert len(runs()) == 3
    experiment = [r for r in runs() if r.data.tags.get("dvc_exp") == "three-epochs"]
    assert len(experiment) == 1 and experiment[0].info.run_name == "three-epochs"
    assert records.run_records(experiment[0].data.metrics, experiment[0].data.tags)
    assert experiment[0].data.params["loss.terms"] == "{'focal': 1.0}"   # replaced, not merged
    assert len(client.search_model_versions("name = 'tiny'")) == 3
    assert client.get_model_version_by_alias("tiny", "champion")

    # A refinement is an evaluation setting (README, "Refinement"): `-S evaluate.postprocess=crf`
    # re-runs evaluate and register, not train, and the version registered for it predicts with
    # the CRF (its inference settings).
    dvc(repo, "exp", "run", "-S", "evaluate.postprocess=crf", "-n", "with-crf", env=env)
    assert len(runs()) == 3
    report = json.loads((repo / "evaluation/evaluate.json").read_text())
    assert 0 <= report["miou"] <= 1
    crf = [v for v in client.search_model_versions("name = 'tiny'") if '"crf"' in v.tags.get("inference", "")]
    assert len(crf) == 1, [v.tags for v in client.search_model_versions("name = 'tiny'")]


CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]


@pytest.mark.slow
def test_dvc_metrics_show_and_diff_fit_a_200_column_terminal(coded, tmp_path):
    """The metrics files the train and evaluate stages write, shown and diffed by DVC."""
    from pipeline.artifacts.model_dir import save_model
    from pipeline.config import paths
    from pipeline.evaluate import evaluate
    from pipeline.tasks.semantic import SemanticTask
    from pipeline.train import write_summary

    repo, env = scratch_repo(tmp_path)
    model, cfg = tiny_model(coded)                   # untrained: the scores' widths are what count
    run = {"mlflow_run_id": "f" * 32, "data_version": "d" * 36}
    save_model(repo / paths.TRAIN_OUT, model, cfg, 3, extra=run)

    def stages(flip_tta: bool, miou: float) -> None:
        # The best epoch as the Ray worker reports it, for CamVid's 11 classes.
        best = {"val_miou": miou, "epoch": 6, "val_pixel_accuracy": 0.877742, "val_mean_dice": 0.7021,
                "val_fwiou": 0.80123, "val_loss": 0.4, "lr": 1e-4} | {f"val_iou_{c}": 0.5 for c in CAMVID}
        write_summary(best, 2.473579791200771, repo / paths.TRAIN_METRICS, repo / paths.TRAIN_PLOTS,
                      SemanticTask())
        params = repo_params(tmp_path / "params.yaml", evaluate={
            "flip_tta": flip_tta, "scales": [1.0], "overlays": {"samples": 1, "worst_per_class": 1}})
        evaluate(repo / paths.TRAIN_OUT, coded, repo / paths.EVAL_OUT, repo / paths.EVAL_METRICS,
                 repo / paths.EVAL_PLOTS, params, track=False)

    def widest(out: str) -> int:
        assert "miou" in out and "best_val_miou" in out, out
        return max(len(line) for line in out.splitlines())

    stages(True, 0.6327282086077749)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run([*git, "commit", "-qm", "first"], cwd=repo, check=True, env=env)
    stages(False, 0.6221)
    show = dvc(repo, "metrics", "show", env=env, stdout_only=True)
    diff = dvc(repo, "metrics", "diff", "--all", env=env, stdout_only=True)
    assert widest(show) <= 200, show
    assert widest(diff) <= 200, diff
    assert "eval_key" in diff                                   # the settings changed, and DVC says so
    plots = json.loads(dvc(repo, "plots", "show", "--json", env=env, stdout_only=True))
    assert {"metrics/plots/evaluate/per_class.json", "metrics/plots/train/val_iou.json"} <= set(plots["data"])


SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATASETS / "dsb2018").is_dir(), reason="needs ../shared/datasets/dsb2018")
def test_the_instance_recipe_through_dvc_repro(tmp_path):
    """recipes/dsb2018.yaml as the params file (README, "Instance segmentation"), shortened:
    the real DSB 2018 nuclei from the mirror through every stage, DVC's output checks included."""
    repo, env = scratch_repo(tmp_path)
    env = env | {"RAY_AUTH_MODE": "disabled", "SEG_DATA_MIRROR": str(SHARED_DATASETS)}
    env.pop("MLFLOW_TRACKING_URI", None)
    params = yaml.safe_load((REPO / "recipes" / "dsb2018.yaml").read_text())
    params["model"] |= {"encoder_weights": None, "image_scale": 1.0,
                        "kwargs": {"box_detections_per_img": 100, "rpn_pre_nms_top_n_train": 300,
                                   "rpn_post_nms_top_n_train": 150, "rpn_pre_nms_top_n_test": 300,
                                   "rpn_post_nms_top_n_test": 150, "box_batch_size_per_image": 64}}
    params["train"] |= {"epochs": 1, "crop_size": [64, 64], "warmup_epochs": 0.2, "threads_per_worker": 1}
    params["evaluate"]["overlays"] = {"samples": 1, "worst_per_class": 1}
    params["register"] |= {"model_name": "nuclei"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    out = dvc(repo, "repro", env=env)
    assert "test: mask AP " in out
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert card["task"] == "instance" and sum(s["instances"] for s in card["splits"].values()) == 4152
    headline = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(headline) == {"eval_key", "mask_ap", "mask_ap50", "mask_ap75", "box_ap", "dsb_score"}
    decision = json.loads((repo / "models/registry.json").read_text())
    assert decision["promoted"] and decision["score_metric"] == "mask_ap" and decision["onnx_uri"] is None
    assert "Data and pipelines are up to date" in dvc(repo, "repro", env=env)
    plots = json.loads(dvc(repo, "plots", "show", "--json", env=env, stdout_only=True))
    assert {"metrics/plots/train/val_ap.json", "metrics/plots/evaluate/per_class_ap.json",
            "metrics/plots/evaluate/precision_recall.json"} <= set(plots["data"])
