"""The train stage with its shared state in an object store (``SEG_STORAGE_URI`` on a real moto
S3 server on loopback): shards, checkpoints, the run's files and the progress journal go there,
nothing into the repository's ``ray_results/``, and a finished run is recognised there."""

import json
import os

import pytest
import ray

from pipeline import train as train_stage
from pipeline.artifacts.model_dir import load_model
from tests.conftest import only_run, write_params
from tests.s3_server import S3Server


@pytest.fixture
def s3_storage(env, monkeypatch):
    """The settings pointing at ``s3://seg/team``, set before the local cluster starts, so that
    its workers have the credentials as a cluster node would."""
    ray.shutdown()
    with S3Server() as s3:
        s3.make_bucket("seg")
        for key, value in s3.env("s3://seg/team").items():
            monkeypatch.setenv(key, value)
        yield s3
        ray.shutdown()


def test_training_keeps_its_state_in_the_object_store(prepared, env, s3_storage):
    params = write_params(env / "params.yaml", epochs=2)
    summary = train_stage.train(prepared, env / "model", env / "metrics.json", params, env / "ray_results",
                                plots_dir=env / "plots")
    assert 0 <= summary["best_val_miou"] <= 1 and load_model(env / "model").meta.class_names
    assert not (env / "ray_results").exists()

    keys = s3_storage.keys("seg", "team/")
    runs = {k.split("/")[2] for k in keys if k.startswith("team/ray_results/train-")}
    assert len(runs) == 1
    run = f"team/ray_results/{runs.pop()}/"
    assert any(k.startswith(run + "checkpoint_") and k.endswith("/state.pt") for k in keys)
    assert len([k for k in keys if k.startswith(run + "progress/") and k.endswith(".json")]) == 2
    client, mlflow_run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    run_id = s3_storage.client().get_object(Bucket="seg", Key=run + "mlflow_run_id")["Body"].read().decode()
    assert run_id == mlflow_run.info.run_id
    complete = json.loads(s3_storage.client().get_object(Bucket="seg", Key=run + "COMPLETE")["Body"].read())
    assert complete["mlflow_run_id"] == run_id
    shards = [k for k in keys if k.startswith("team/prepared/")]
    assert any(k.endswith("_COMPLETE") for k in shards) and any(k.endswith(".parquet") for k in shards)

    # A finished run is not resumed: the same training again starts afresh, in a new MLflow run.
    train_stage.train(prepared, env / "model", env / "metrics.json", params, env / "ray_results",
                      plots_dir=env / "plots")
    from mlflow.tracking import MlflowClient

    runs_now = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs([mlflow_run.info.experiment_id])
    assert len(runs_now) == 2
    assert len([k for k in s3_storage.keys("seg", run + "progress/") if k.endswith(".json")]) == 2


def test_pretrained_weights_reach_workers_without_the_drivers_folder(tmp_path, monkeypatch):
    """With shared storage, the registered weight files of ``$SEG_WEIGHTS_DIR`` are published
    and each worker copies them into a local folder of its own, once."""
    from pipeline.artifacts.storage import storage_from_env
    from pipeline.config import paths
    from pipeline.config.params import ModelParams
    from pipeline.engine.worker import fetch_weights
    from pipeline.models.weights import ENCODER_WEIGHT_FILES

    weights = tmp_path / "weights"
    weights.mkdir()
    name = ENCODER_WEIGHT_FILES["mobilenet_v2"].name
    (weights / name).write_bytes(b"w" * 100)
    (weights / "unrelated.bin").write_bytes(b"x")
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(weights))
    model = ModelParams.defaults()
    with S3Server() as s3:
        s3.make_bucket("seg")
        for key, value in s3.env("s3://seg/team").items():
            monkeypatch.setenv(key, value)
        store = storage_from_env()
        assert train_stage.shipped_weights(None, model) is None                 # no shared storage
        assert train_stage.shipped_weights(store, model.model_copy(update={"encoder_weights": None})) is None
        published = train_stage.shipped_weights(store, model)
        assert published.files() == ["_COMPLETE", name]                          # only registered files
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node2"))
        (tmp_path / "node2").mkdir()
        local = fetch_weights(published)
        assert local.parent == tmp_path / "node2" and (local / name).read_bytes() == b"w" * 100
        published.child(name).write_bytes(b"changed")            # fetched once: not read again
        assert (fetch_weights(published) / name).read_bytes() == b"w" * 100
