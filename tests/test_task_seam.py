"""The task seam is real: a task defined in tests only runs through the stages' own commands."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config.params import default_params
from tests.factories import make_colour_coded_dataset
from tests.tasks.foreground import NAME, foreground_dice

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.slow
def test_a_task_defined_in_tests_runs_through_prepare_train_evaluate_register(tmp_path):
    """dvc.yaml's commands, in order, on tiny colour-coded data with ``prepare.task`` naming
    ``tests.tasks.foreground``: the best epoch, the evaluation's headline and the registry gate
    all go by that task's primary score (foreground Dice), not by mIoU."""
    make_colour_coded_dataset(tmp_path / "user", n=20)
    work = tmp_path / "work"
    work.mkdir()
    params = default_params({
        "download": {"dataset": "folder", "folder": str(tmp_path / "user")},
        "prepare": {"task": NAME, "classes": ["background", "road", "car"], "workers": 1,
                    "test_fraction": 0.2},
        "model": {"encoder_name": "resnet18", "encoder_weights": None},
        "loss": {"terms": {"ce": 0.5, "dice": 0.5}, "class_weights": None},
        "train": {"epochs": 2, "batch_size": 4, "crop_size": [32, 32], "warmup_epochs": 0.2,
                  "threads_per_worker": 1},
        "evaluate": {"overlays": {"samples": 2, "worst_per_class": 1}},
        "register": {"model_name": "foreground", "onnx": False},
    })
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("SEG_DATA_MIRROR", None)
    env.pop("RAY_ADDRESS", None)
    for name in ("download", "prepare", "train", "evaluate", "register"):
        cmd = shlex.split(" ".join(STAGES[name]["cmd"].split()))
        assert cmd[0] == "python"
        done = subprocess.run([sys.executable, *cmd[1:]], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"

    assert json.loads((work / "data/prepared/card.json").read_text())["task"] == NAME
    assert json.loads((work / "models/train/model.json").read_text())["meta"]["task"] == NAME
    train = json.loads((work / "metrics/train.json").read_text())
    assert "best_val_fg_dice" in train and "best_val_miou" not in train
    report = json.loads((work / "evaluation/evaluate.json").read_text())
    assert report["primary_metric"] == "fg_dice"
    counts = json.loads((work / "evaluation/confusion.json").read_text())["counts"]
    assert report["fg_dice"] == pytest.approx(foreground_dice(counts))
    assert json.loads((work / "metrics/evaluate.json").read_text())["fg_dice"] == report["fg_dice"]
    decision = json.loads((work / "models/registry.json").read_text())
    assert decision["promoted"] and decision["test_score"] == report["fg_dice"] != report["miou"]
    assert decision["score_metric"] == "fg_dice"
    tags = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("foreground", "champion").tags
    assert (tags["task"], tags["score_metric"]) == (NAME, "fg_dice")
    assert float(tags["test_score"]) == report["fg_dice"]
