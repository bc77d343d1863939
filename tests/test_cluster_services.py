"""``pipeline.cluster``: the shared storage's DVC remote and MLflow server, against a real S3
server (moto) on loopback."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.artifacts.storage import Storage
from pipeline.cluster import dvc_remote_commands, mlflow_server_command
from tests.factories import free_port, make_folder_dataset
from tests.s3_server import S3Server
from tests.test_dvc_pipeline import digests, dvc, scratch_repo


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.make_bucket("seg")
        yield server


def test_the_commands_name_the_storage_folders():
    store = Storage("s3://seg/team", "http://127.0.0.1:9000")
    assert dvc_remote_commands(store) == [
        ["remote", "add", "--local", "--force", "--default", "storage", "s3://seg/team/dvc"],
        ["remote", "modify", "--local", "storage", "endpointurl", "http://127.0.0.1:9000"]]
    command, env = mlflow_server_command(store, "sqlite:///x.db", "0.0.0.0", 5000)
    assert command[1:] == ["server", "--backend-store-uri", "sqlite:///x.db", "--artifacts-destination",
                           "s3://seg/team/mlflow", "--serve-artifacts", "--host", "0.0.0.0", "--port", "5000"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_unset_storage_is_refused_naming_the_setting(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SEG_STORAGE_URI"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cluster", "dvc-remote"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "cluster: SEG_STORAGE_URI is not set: name the shared storage (s3://bucket/prefix or a folder every "
        "node mounts)")


def test_dvc_pushes_to_and_pulls_from_the_object_store(tmp_path, s3):
    repo, env = scratch_repo(tmp_path)
    env = env | s3.env("s3://seg/team")
    make_folder_dataset(tmp_path / "user", n=6, binary_255=True)
    params = (repo / "params.yaml").read_text().replace("  folder: null", f"  folder: {tmp_path / 'user'}", 1)
    (repo / "params.yaml").write_text(params.replace("  dataset: camvid", "  dataset: folder", 1)
                                      .replace("  classes: null", "  classes: [background, object]", 1))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cluster", "dvc-remote"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "s3://seg/team/dvc" in (repo / ".dvc" / "config.local").read_text()
    dvc(repo, "repro", "prepare", env=env)
    dvc(repo, "commit", "--force", "data.dvc", env=env)
    before = digests(repo / "data/raw"), digests(repo / "data/prepared")
    dvc(repo, "push", "data.dvc", "prepare", env=env)
    assert any(k.startswith("team/dvc/files/md5/") for k in s3.keys("seg", "team/dvc/"))
    for path in ("data/raw", "data/prepared", ".dvc/cache"):
        shutil.rmtree(repo / path)
    dvc(repo, "pull", "data.dvc", "prepare", env=env)
    assert (digests(repo / "data/raw"), digests(repo / "data/prepared")) == before


def test_the_mlflow_server_keeps_artifacts_in_the_object_store(tmp_path, s3):
    port = free_port()
    command = [sys.executable, "-m", "pipeline.cluster", "mlflow-server", "--host", "127.0.0.1",
               "--backend", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)]
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=os.environ | s3.env("s3://seg/team"), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                alive = server.poll() is None and time.monotonic() < deadline
                assert alive, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        (tmp_path / "model.json").write_text("{}")
        # A client without the object store's credentials: the server carries the artifact there.
        client_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SEG_"))}
        script = (f"import mlflow; mlflow.set_tracking_uri('http://127.0.0.1:{port}')\n"
                  "with mlflow.start_run() as run: mlflow.log_artifact('model.json')\n"
                  "print(run.info.artifact_uri)")
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=client_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("mlflow-artifacts:/")
        keys = s3.keys("seg", "team/mlflow/")
        assert any(k.endswith("/model.json") for k in keys), keys
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
