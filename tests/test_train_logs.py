"""What a person sees when the train stage runs: ``python -m pipeline.train`` in a fresh
process on tiny data, stdout and stderr together as ``dvc repro`` shows them."""

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
TRACEBACK_MARKERS = re.compile(r"^(\S*\(\S+ pid=\d+\)\S*)?\s*[\^~]+\s*$")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train loss \d\.\d{4}  val loss \d\.\d{4}  val mIoU \d\.\d{4}"
                        r"  \d+\.\d img/s  elapsed \S+  left ~\S+$")


def tiny_params(path: Path) -> Path:
    """The repository's params.yaml with a tiny, fast model and two epochs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] |= {"arch": "Unet", "encoder_name": "resnet18", "encoder_weights": None}
    params["loss"]["terms"] = {"ce": 0.5, "dice": 0.5}
    params["train"] |= {"epochs": EPOCHS, "batch_size": 2, "val_batch_size": 2, "crop_size": [32, 32],
                        "warmup_epochs": 0.2, "num_workers": 2, "cpus_per_worker": 0.5}
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_train_stage_prints_one_line_per_epoch_and_no_ray_chatter(prepared, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "SEG_RAY_LOG_LEVEL", "RAY_DATA_LOG_LEVEL")}
    env |= {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "HOME": str(tmp_path)}       # Ray keeps its token in ~/.ray: not the user's
    cmd = [sys.executable, "-m", "pipeline.train", "--data", str(prepared), "--out", "model",
           "--metrics", "metrics.json", "--params", str(tiny_params(tmp_path / "params.yaml")),
           "--storage", "ray_results"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    log = done.stdout
    (tmp_path / "console.log").write_text(log)
    assert done.returncode == 0, log
    lines = [line for line in log.splitlines() if line.strip()]

    epoch_lines = [line for line in lines if re.search(r"\bepoch \d+/\d+", line)]
    assert len(epoch_lines) == EPOCHS, log
    for n, line in enumerate(epoch_lines, 1):
        match = EPOCH_LINE.fullmatch(line)
        assert match and match.groups() == (str(n), str(EPOCHS)), line    # printed by the driver, unprefixed

    assert "TrainingReport" not in log and "Reporting training result" not in log
    # A traceback's caret markers may repeat by right (Ray prints one here when another local
    # cluster runs on the same machine); every other line must be said once.
    said = [line for line in lines if not TRACEBACK_MARKERS.search(line)]
    repeated = {line: n for line, n in collections.Counter(said).items() if n > 1}
    assert not repeated, log
    assert not re.search(r"token auth", log, re.IGNORECASE), log
    # Ray's INFO chatter (cluster start, dataset execution plans, worker group set-up) is hidden.
    for chatter in ("Started a local Ray instance", "Starting execution of Dataset", "Execution plan",
                    "Setting up process group", "Started training worker group", "Progress bars disabled"):
        assert chatter not in log, chatter
    assert "best validation mIoU" in log
