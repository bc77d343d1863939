"""Shared fixtures: a tiny prepared dataset and an isolated MLflow store for training tests."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config.params import PrepareParams, default_params
from pipeline.prepare import prepare
from tests.factories import (
    fit_tiny_model,
    make_colour_coded_dataset,
    make_folder_dataset,
    make_nuclei_dataset,
)
from tests.http_server import LoopbackServer

CLASSES = ["background", "road", "car"]
TINY = {
    "model": {"arch": "Unet", "encoder_name": "resnet18", "encoder_weights": None},
    "loss": {"terms": {"ce": 0.5, "dice": 0.5}, "class_weights": None},
    "train": {"epochs": 3, "batch_size": 2, "val_batch_size": 2, "crop_size": [32, 32],
              "warmup_epochs": 0.2, "num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_folder_dataset(root / "raw", n=24, num_classes=3, size=(48, 64))
    cfg = PrepareParams.defaults(classes=CLASSES, workers=1, val_fraction=0.2)
    prepare("folder", root / "raw", root / "prepared", cfg)
    return root / "prepared"


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """A prepared dataset whose colours give the classes, with a test split."""
    root = tmp_path_factory.mktemp("coded")
    make_colour_coded_dataset(root / "raw", n=20)
    cfg = PrepareParams.defaults(classes=CLASSES, workers=1, val_fraction=0.2, test_fraction=0.25)
    prepare("folder", root / "raw", root / "prepared", cfg)
    return root / "prepared"


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory):
    """16 generated 64x80 images of bright discs in the DSB 2018 layout, prepared as an
    instance dataset (tests.factories.make_nuclei_dataset)."""
    root = tmp_path_factory.mktemp("nuclei")
    make_nuclei_dataset(root / "raw", n=16)
    cfg = PrepareParams.defaults(task="instance", workers=1, val_fraction=0.2, test_fraction=0.25)
    prepare("dsb2018", root / "raw", root / "prepared", cfg)
    return root / "prepared"


@pytest.fixture(scope="module")
def fitted(coded):
    return fit_tiny_model(coded)


@pytest.fixture(scope="module")
def local_ray():
    """The local cluster as the train stage starts it (``init_ray``), shared by the module."""
    import ray

    from pipeline import train as train_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.shutdown()
        train_stage.init_ray()
        yield
        ray.shutdown()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.chdir(tmp_path)          # mlruns/ and dvc.lock look-ups stay in tmp_path
    return tmp_path


def write_params(path: Path, **train_overrides) -> Path:
    """The repository's params.yaml with the TINY recipe and ``train_overrides``."""
    params = default_params({**TINY, "train": TINY["train"] | train_overrides})
    path.write_text(yaml.safe_dump(params))
    return path


def only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]




@pytest.fixture
def server():
    """A loopback HTTP file server (tests/http_server.py), shut down after the test."""
    with LoopbackServer() as srv:
        yield srv
