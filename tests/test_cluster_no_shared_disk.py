"""A two-node Ray cluster whose nodes share nothing but the network, built on this machine from
real parts: an S3 server on loopback (moto), an MLflow server keeping its artifacts there, a Ray
head, and a second Ray node started in its own mount namespace (``unshare --mount``, root) with
private tmpfs over the repository, ``/tmp`` (the tests' folders, Ray's session folders) and
``../shared`` (datasets, weights): it sees the Python environment and a copy of ``pipeline/``
(what a node's image holds), nothing of the driver's disk.

The train stage runs two workers spread over the two nodes with its state in the object store
(``SEG_STORAGE_URI``); the worker on the second node is killed after the first checkpoint, and
the run must resume from the checkpoint in the object store, in the same MLflow run. Then the
model is evaluated and registered, and a Serve replica placed on the second node answers
``/predict``.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from pipeline.config.params import default_params
from tests.conftest import TINY
from tests.factories import free_port
from tests.s3_server import S3Server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights"
EPOCHS = 8

pytestmark = [
    pytest.mark.slow,           # two Ray nodes, an MLflow server, training, Serve: about 5 minutes
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare for the second node's mount namespace"),
]


def node_script(head: str, hidden: list[Path]) -> str:
    """The second node: a private view of the disk, then ``ray start`` joining ``head``."""
    venv = Path(sys.prefix)
    lines = ["set -euo pipefail", "mount --make-rprivate /",
             "image=/mnt", "mount -t tmpfs tmpfs $image",          # the node image's own copies
             f"cp -r {shlex.quote(str(REPO / 'pipeline'))} $image/pipeline",
             "find $image/pipeline -name __pycache__ -prune -exec rm -rf {} +"]
    inside = venv.is_relative_to(REPO)
    if inside:                              # the environment lives in the repository: keep it visible
        lines += ["mkdir $image/venv", f"mount --bind -o ro {shlex.quote(str(venv))} $image/venv"]
    for path in hidden:
        lines.append(f"mount -t tmpfs tmpfs {shlex.quote(str(path))}")
    if inside:
        lines += [f"mkdir -p {shlex.quote(str(venv))}", f"mount --bind $image/venv {shlex.quote(str(venv))}"]
    lines += [f"cp -r $image/pipeline {shlex.quote(str(REPO / 'pipeline'))}",
              f"exec {shlex.quote(str(venv / 'bin' / 'ray'))} start --address={head} --num-cpus=2 "
              "--node-ip-address=127.0.0.1 --resources='{\"node2\": 1}' --disable-usage-stats --block"]
    return "\n".join(lines)


def wait_for(check, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"no {what} within {timeout_s:.0f} s")


def descendants(pid: int, needle: str) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def healthy(url: str, proc: subprocess.Popen, log: Path) -> bool:
    """Whether ``url``/health answers 200; the server's log when its process has ended."""
    assert proc.poll() is None, log.read_text()[-5000:]
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


STAGE = [sys.executable, "-m"]
TRAIN = [*STAGE, "pipeline.train", "--data", "data/prepared", "--out", "models/train", "--metrics",
         "metrics/train.json", "--plots", "metrics/plots/train"]
EVALUATE = [*STAGE, "pipeline.evaluate", "--model", "models/train", "--data", "data/prepared", "--out",
            "evaluation", "--metrics", "metrics/evaluate.json", "--plots", "metrics/plots/evaluate"]
REGISTER = [*STAGE, "pipeline.register", "--model", "models/train", "--metrics", "evaluation/evaluate.json",
            "--data", "data/prepared", "--out", "models/registry.json"]


class Cluster:
    """The object store, the tracking server, the head and the second node; ``driver_env``
    is the environment of a stage run on the head."""

    def __init__(self, s3: S3Server, root: Path):
        self.s3, self.root, self.procs = s3, root, []
        self.ray_tmp = root / "ray"
        self.storage = s3.env("s3://seg/cluster")
        self.node_env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "MLFLOW_"))} | {
            "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
            # The node's own credentials (an instance role on a cloud); nothing else of the driver's.
            **{k: v for k, v in self.storage.items() if k.startswith("AWS_")}}
        self.tracking = f"http://127.0.0.1:{free_port()}"
        self.head = f"127.0.0.1:{free_port()}"
        self.driver_env = self.node_env | self.storage | {"RAY_ADDRESS": self.head,
                                                          "MLFLOW_TRACKING_URI": self.tracking}
        # The second node's log sits outside the folder its namespace hides.
        self.node2_log = root.parent / f"{root.name}-node2.log"

    def start(self, name: str, args: list[str], env: dict, log: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        with open(log or self.root / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(args, cwd=cwd or self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Cluster:
        self.s3.make_bucket("seg")
        port = self.tracking.rsplit(":", 1)[1]
        mlflow = self.start("mlflow", [*STAGE, "pipeline.cluster", "mlflow-server", "--host", "127.0.0.1",
                              "--port", port, "--backend", f"sqlite:///{self.root / 'mlflow-server.db'}"],
                   self.node_env | self.storage)
        wait_for(lambda: healthy(self.tracking, mlflow, self.root / "mlflow.log"), 120, "MLflow server")
        ray = str(Path(sys.prefix) / "bin" / "ray")
        # Its own temporary folder (short: Ray's sockets live there), so that the address `ray start`
        # records there (ray_current_cluster) goes with it.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
        head = self.start("head", [ray, "start", "--head", f"--port={self.head.rsplit(':', 1)[1]}",
                                   f"--temp-dir={self.ray_tmp}",
                                   "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"head": 1}',
                                   "--include-dashboard=false", "--disable-usage-stats", "--block"],
                          self.node_env)
        log = self.root / "head.log"
        wait_for(lambda: b"Ray runtime started" in log.read_bytes() or head.poll() is not None, 120,
                 "Ray head")
        assert head.poll() is None, (self.root / "head.log").read_text()
        hidden = [REPO, Path("/tmp")] + ([SHARED] if SHARED.is_dir() else [])
        script = node_script(self.head, hidden)
        namespace = ["unshare", "--mount", "--propagation", "private"]
        self.node2 = self.start("node2", [*namespace, "bash", "-c", script], self.node_env,
                                log=self.node2_log)
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def checkpointed(self) -> bool:
        """Whether Ray Train has registered a checkpoint of the run (its checkpoint manager's
        snapshot in the object store names one): a restart then resumes from it. A checkpoint
        reported but not yet registered when a worker dies is not resumed from (Ray Train runs
        that epoch again), so killing earlier would not test resuming."""
        client = self.s3.client()
        for key in self.s3.keys("seg", "cluster/ray_results/"):
            if key.endswith("/checkpoint_manager_snapshot.json"):
                return b"checkpoint_" in client.get_object(Bucket="seg", Key=key)["Body"].read()
        return False


def recipe(serve_port: int) -> dict:
    """The tiny recipe on two workers, one a node; ImageNet MobileNetV2 weights when
    ../shared/weights has them (the second node gets them through the storage)."""
    model = TINY["model"]
    if WEIGHTS.is_dir():
        model = {"arch": "Unet", "encoder_name": "mobilenet_v2", "encoder_weights": "imagenet"}
    params = default_params({**TINY, "model": model, "train": TINY["train"] | {
        "epochs": EPOCHS, "placement_strategy": "STRICT_SPREAD", "lr": 3e-3}})
    params["evaluate"] |= {"flip_tta": False, "scales": [1.0],
                           "overlays": {"samples": 1, "worst_per_class": 0}}
    params["register"] |= {"model_name": "cluster", "onnx": False}
    params["serve"] |= {"port": serve_port, "proxy_location": "HeadOnly", "replicas": 1,
                        "cpus_per_replica": 1}
    return params


def png(image: np.ndarray) -> bytes:
    body = io.BytesIO()
    Image.fromarray(image).save(body, format="PNG")
    return body.getvalue()


def test_train_register_and_serve_across_two_nodes_that_share_no_disk(coded, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    with S3Server() as s3, Cluster(s3, tmp_path) as cluster:
        ray.init(address=cluster.head, log_to_driver=False)
        try:
            def joined() -> bool:
                return len([n for n in ray.nodes() if n["Alive"]]) == 2 or cluster.node2.poll() is not None

            wait_for(joined, 180, "second node")
            assert cluster.node2.poll() is None, cluster.node2_log.read_text()

            # What the second node sees of the disk: the code of its image, nothing of the driver's.
            @ray.remote(num_cpus=0, resources={"node2": 0.01})
            def view(paths: list[str]) -> dict[str, bool]:
                return {p: os.path.exists(p) for p in paths}

            hidden = [REPO / "tests", REPO / "params.yaml", coded, tmp_path, WEIGHTS]
            code = REPO / "pipeline" / "train.py"
            seen = ray.get(view.remote([str(p) for p in [*hidden, code]]))
            assert seen == {**{str(p): False for p in hidden}, str(code): True}, seen

            repo = tmp_path / "repo"
            (repo / "data").mkdir(parents=True)
            shutil.copytree(coded, repo / "data" / "prepared")
            serve_port = free_port()
            (repo / "params.yaml").write_text(yaml.safe_dump(recipe(serve_port)))
            env = cluster.driver_env | ({"SEG_WEIGHTS_DIR": str(WEIGHTS)} if WEIGHTS.is_dir() else {})

            # Train; kill the second node's worker once a checkpoint is registered in the store.
            train = cluster.start("train", TRAIN, env, cwd=repo)
            wait_for(lambda: cluster.checkpointed() or train.poll() is not None, 600, "a checkpoint",
                     every_s=0.5)
            assert train.poll() is None, (tmp_path / "train.log").read_text()[-5000:]
            workers = descendants(cluster.node2.pid, "RayTrainWorker")
            assert len(workers) == 1, [p.cmdline() for p in descendants(cluster.node2.pid, "ray::")]
            workers[0].kill()
            assert train.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-5000:]
            assert not psutil.pid_exists(workers[0].pid) and not (repo / "ray_results").exists()

            client = MlflowClient(cluster.tracking)
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
            assert len(runs) == 1                       # the resumed run went on in the same MLflow run
            run_id = runs[0].info.run_id
            steps = [m.step for m in client.get_metric_history(run_id, "val_miou")]
            assert set(steps) == set(range(EPOCHS)), steps
            # Resumed from the checkpoint in the store, not restarted: the restarted workers began
            # after epoch 0 (epochs between that checkpoint and the kill may run twice).
            starts = [m.value for m in client.get_metric_history(run_id, "start_epoch")]
            assert min(starts) == 0 and max(starts) >= 1, starts
            assert client.get_metric_history(run_id, "nodes")[-1].value == 2
            keys = s3.keys("seg", "cluster/")
            assert any("/checkpoint_" in k for k in keys) and any(k.endswith("/COMPLETE") for k in keys)
            assert any(k.startswith("cluster/prepared/") for k in keys)
            assert any(k.startswith("cluster/mlflow/") for k in keys)     # the model, through the server
            if WEIGHTS.is_dir():
                assert any(k.startswith("cluster/weights/") and k.endswith(".pth") for k in keys)

            # Evaluate and register on the driver, against the tracking server.
            run(EVALUATE, repo, env)
            run(REGISTER, repo, env)
            assert json.loads((repo / "models" / "registry.json").read_text())["promoted"]
            assert client.get_model_version_by_alias("cluster", "champion")

            # Serve with the head's CPUs taken: the replica can only go to the second node.
            @ray.remote(num_cpus=2, resources={"head": 1})
            class Holder:
                def ready(self) -> bool:
                    return True

            holder = Holder.remote()
            assert ray.get(holder.ready.remote())
            server = cluster.start("serve", [*STAGE, "pipeline.serve"], env, cwd=repo)
            url = f"http://127.0.0.1:{serve_port}"

            wait_for(lambda: healthy(url, server, tmp_path / "serve.log"), 300, "Serve /health")
            assert descendants(cluster.node2.pid, "ServeReplica"), "the replica is not on the second node"
            image = np.zeros((40, 56, 3), np.uint8)
            image[:, 28:] = (200, 30, 30)
            request = urllib.request.Request(url + "/predict", data=png(image), method="POST",
                                             headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                assert reply.status == 200
                assert np.array(Image.open(io.BytesIO(reply.read()))).shape == (40, 56)
        finally:
            ray.shutdown()
