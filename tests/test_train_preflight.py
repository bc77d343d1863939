"""The train stage refuses a configuration it cannot train before MLflow and Ray start: once,
in one line, never as a worker failure that Ray retries (issue 15, items 4 and 13)."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import paths
from pipeline.config.params import default_params
from tests.conftest import TINY

# smp's resnet18 has ImageNet weights on the hub, and none registered for $SEG_WEIGHTS_DIR.
NO_LOCAL_WEIGHTS = "resnet18"


@pytest.fixture
def ray_tmp():
    """Where a Ray started by the stage would put its session: short, as its sockets need."""
    folder = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    yield folder / "ray"
    shutil.rmtree(folder, ignore_errors=True)


def write_params(env_dir: Path, model: dict) -> Path:
    params = env_dir / "params.yaml"
    data = default_params(TINY)
    data["model"] |= model                     # unvalidated: the stage must refuse what is wrong
    params.write_text(yaml.safe_dump(data))
    return params


def run_train(env_dir, prepared, ray_tmp, model: dict, **env) -> tuple[subprocess.CompletedProcess, float]:
    params = write_params(env_dir, model)
    clean = {k: v for k, v in os.environ.items() if k != paths.ENV_WEIGHTS_DIR}
    cmd = [sys.executable, "-m", "pipeline.train", "--data", str(prepared), "--out", str(env_dir / "model"),
           "--metrics", str(env_dir / "metrics.json"), "--params", str(params),
           "--storage", str(env_dir / "ray_results")]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=env_dir, capture_output=True, text=True, timeout=300, env={
        **clean, "PYTHONPATH": str(paths.REPO_PARAMS_FILE.parent),
        "MLFLOW_TRACKING_URI": f"sqlite:///{env_dir / 'mlflow.db'}", "RAY_TMPDIR": str(ray_tmp),
        "RAY_AUTH_MODE": "disabled", **env})
    return proc, time.monotonic() - start


def assert_refused_before_ray_and_mlflow(proc, env_dir, ray_tmp):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not ray_tmp.exists(), "Ray was started"
    assert "Started a local Ray instance" not in proc.stderr
    assert not (env_dir / "mlflow.db").exists(), "an MLflow run was opened"
    assert not (env_dir / "model").exists()


def test_offline_imagenet_weights_fail_once_in_one_line_before_ray(prepared, tmp_path, ray_tmp):
    model = {"encoder_name": NO_LOCAL_WEIGHTS, "encoder_weights": "imagenet"}
    proc, seconds = run_train(tmp_path, prepared, ray_tmp, model, HF_HUB_OFFLINE="1",
                              HF_HOME=str(tmp_path / "hf"))
    assert_refused_before_ray_and_mlflow(proc, tmp_path, ray_tmp)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: ") and NO_LOCAL_WEIGHTS in last, proc.stderr[-3000:]
    assert paths.ENV_WEIGHTS_DIR in last and "huggingface.co" in last
    lines = [line for line in proc.stderr.splitlines() if NO_LOCAL_WEIGHTS in line]
    assert lines == [last]                                    # once: not per worker, nor per restart
    assert seconds < 60


@pytest.mark.parametrize(("model", "message"), [
    ({"kwargs": {"decoder_atention_type": "scse"}}, "model.kwargs.decoder_atention_type: not a keyword"),
    ({"encoder_name": "resnet19"}, "model.encoder_name: unknown encoder 'resnet19'"),
    ({"kwargs": {"aux_params": {"classes": 3}}}, "model.kwargs.aux_params: not supported"),
], ids=["misspelt-kwarg", "unknown-encoder", "aux-params"])
def test_a_model_config_error_is_refused_before_ray(prepared, env, model, message):
    import ray

    from pipeline import train

    params = write_params(env, model)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(prepared), "--out", str(env / "model"), "--params", str(params),
                    "--metrics", str(env / "metrics.json"), "--storage", str(env / "ray_results")])
    assert message in str(exit_.value.code).splitlines()[-1]
    assert not ray.is_initialized()
    assert not (env / "mlflow.db").exists() and not (env / "ray_results").exists()


def test_a_card_naming_a_task_that_cannot_be_imported_is_refused_before_ray(prepared, env):
    import json

    import ray

    from pipeline import train

    data = env / "prepared"
    shutil.copytree(prepared, data)
    card = json.loads((data / paths.CARD_JSON).read_text())
    (data / paths.CARD_JSON).write_text(json.dumps(card | {"task": "no_such_package.tasks:Binary"}))
    params = write_params(env, {})
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(data), "--out", str(env / "model"), "--params", str(params),
                    "--metrics", str(env / "metrics.json"), "--storage", str(env / "ray_results")])
    last = str(exit_.value.code).splitlines()[-1]
    assert "task 'no_such_package.tasks:Binary': cannot import" in last, last
    assert not ray.is_initialized() and not (env / "mlflow.db").exists()


@pytest.mark.parametrize("bucket, message", [
    ("missing", "SEG_STORAGE_URI=s3://missing/runs: bucket 'missing' does not exist at SEG_S3_ENDPOINT_URL="),
    (None, "SEG_STORAGE_URI=s3://seg/runs: the endpoint at SEG_S3_ENDPOINT_URL=http://127.0.0.1:"),
])
def test_unusable_shared_storage_is_refused_before_ray(prepared, env, monkeypatch, bucket, message):
    """An object store that does not answer, or a bucket it does not have: one line naming
    the URI and the setting, before Ray or MLflow starts (issue 21)."""
    import ray

    from pipeline import train
    from tests.factories import free_port
    from tests.s3_server import S3Server

    with S3Server() as s3:
        s3.make_bucket("seg")
        for key, value in s3.env(f"s3://{bucket or 'seg'}/runs").items():
            monkeypatch.setenv(key, value)
        if bucket is None:                            # nothing listens there
            monkeypatch.setenv(paths.ENV_S3_ENDPOINT_URL, f"http://127.0.0.1:{free_port()}")
        params = write_params(env, {})
        with pytest.raises(SystemExit) as exit_:
            train.main(["--data", str(prepared), "--out", str(env / "model"), "--params", str(params),
                        "--metrics", str(env / "metrics.json"), "--storage", str(env / "ray_results")])
    last = str(exit_.value.code)
    assert last.startswith("train: ") and message in last and "\n" not in last, last
    assert not ray.is_initialized()
    assert not (env / "mlflow.db").exists() and not (env / "ray_results").exists()


STALE_ADDRESS = """
import ray
from pipeline import serve, train
train.init_ray()
assert ray.is_initialized()
ray.shutdown()
serve.init_ray(log_to_driver=False)
assert ray.is_initialized()
ray.shutdown()
print("started")
"""


def test_a_cluster_that_an_earlier_ray_start_left_behind_is_not_joined(tmp_path):
    """``ray start`` writes its address to <ray temp>/ray_current_cluster and a bare ``ray.init()``
    joins it (or fails when it is gone): without $RAY_ADDRESS the stages start a new local
    cluster whatever that file says."""
    folder = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))        # short: Ray's sockets live there
    try:
        (folder / "ray").mkdir()
        (folder / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")     # a cluster long gone
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "RAY_TMPDIR": str(folder), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(paths.REPO_ROOT)}
        proc = subprocess.run([sys.executable, "-c", STALE_ADDRESS], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("started"), proc.stderr[-3000:]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
