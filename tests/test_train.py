"""Training on a real local Ray cluster with tiny generated data, tracked in a real MLflow store."""

import json
import os
import signal
import threading
import time

import mlflow
import numpy as np
import psutil
import pytest
import ray
import ray.data
import torch
from mlflow.tracking import MlflowClient
from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

from pipeline import train as train_stage
from pipeline.artifacts.model_dir import load_model
from pipeline.config.params import LossParams, ModelParams, TrainParams, load_params
from pipeline.data import shards
from pipeline.engine import priority
from pipeline.engine.ingest import ShardConfig
from pipeline.engine.loop import evaluate, memory_format
from pipeline.inference.tensors import predict_mask
from pipeline.tasks import get_task
from pipeline.tasks.semantic import VAL_IOU_PLOT
from tests.conftest import CLASSES, only_run, write_params


def test_two_workers_train_track_one_run_and_export_a_model(prepared, env, local_ray):
    params = write_params(env / "params.yaml")
    summary = train_stage.train(prepared, env / "model", env / "metrics.json", params, env / "ray_results",
                                plots_dir=env / "plots")

    assert 0 <= summary["best_val_miou"] <= 1 and json.loads((env / "metrics.json").read_text()) == summary
    val_iou = json.loads((env / "plots" / VAL_IOU_PLOT).read_text())     # DVC plots data
    assert [row["class"] for row in val_iou] == CLASSES
    model = load_model(env / "model")
    assert list(model.meta.class_names) == CLASSES
    mask = predict_mask(model, np.zeros((37, 53, 3), np.uint8))       # any size
    assert mask.shape == (37, 53) and mask.max() < 3

    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.arch"] == "Unet"
    assert run.data.tags["data_version"].startswith("raw-sha256:")
    assert run.data.tags["git_commit"]
    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert [m.step for m in history] == [0, 1, 2]
    assert len(client.get_metric_history(run.info.run_id, "val_iou_car")) == 3
    assert client.get_metric_history(run.info.run_id, "workers")[-1].value == 2
    assert run.data.metrics["best_val_miou"] == pytest.approx(summary["best_val_miou"])
    # The best epoch's validation score is the exported model's own: every rank validated
    # the weights and batch-norm statistics rank 0 saved, not its own running statistics.
    assert _val_miou(env / "model", prepared, load_params(TrainParams, params)) == summary["best_val_miou"]

    # The local cluster this process started runs its own processes at the lowest priority.
    cluster = [p for p in psutil.Process().children(recursive=True) if "gcs_server" in " ".join(p.cmdline())]
    assert cluster and all(p.nice() == priority.BACKGROUND_NICE for p in cluster)
    # ... and without Ray Train's placement-group cleaner, nor the dashboard it would poll.
    actor_classes = {actor["ActorClassName"] for actor in ray._private.state.actors().values()}
    assert any("TrainController" in name for name in actor_classes)
    assert not any("PlacementGroupCleaner" in name for name in actor_classes)
    assert not ray._private.worker._global_node.address_info.get("webui_url")

    # The logged model predicts on any size and knows its classes.
    pyfunc = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    masks = pyfunc.predict([np.zeros((20, 30, 3), np.uint8), np.zeros((41, 17, 3), np.uint8)])
    assert [m.shape for m in masks] == [(20, 30), (41, 17)]


def _val_miou(model_dir, prepared, cfg: TrainParams) -> float:
    """The saved model's mIoU on the val split, taken as ``cfg``'s training workers take it:
    each of ``num_workers`` ranks every ``num_workers``-th row in batches of
    ``val_batch_size``, ``threads_per_worker`` threads, in ``channels_last`` layout."""
    model = load_model(model_dir).to(memory_format=memory_format(cfg.channels_last))
    world, batch_size = cfg.num_workers, cfg.val_batch_size
    meta, task = model.meta, get_task("semantic")
    table = shards.read_split(prepared, "val")
    images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
    norm = {"mean": meta.mean, "std": meta.std, "ignore_index": meta.ignore_index}
    batches = []
    for rank in range(world):
        mine, theirs = images[rank::world], masks[rank::world]
        batches += [task.collate(mine[i:i + batch_size], theirs[i:i + batch_size], **norm)
                    for i in range(0, len(mine), batch_size)]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_worker)
    try:
        metric, _ = evaluate(model, batches, task.metric(len(meta.class_names), meta.ignore_index,
                                                         torch.device("cpu")),
                             torch.device("cpu"), channels_last=cfg.channels_last, task=task)
    finally:
        torch.set_num_threads(threads)
    return task.epoch_metrics(metric.compute(), meta.class_names)["val_miou"]


def test_a_time_budget_stops_training_before_an_epoch_that_would_overrun_it(prepared, env, local_ray, caplog):
    """train.max_minutes far below one epoch: the first epoch runs (at least one always does),
    no second starts, the best (only) epoch is exported and the log says why it stopped."""
    params = write_params(env / "params.yaml", epochs=20, max_minutes=0.001)
    with caplog.at_level("INFO", logger="pipeline.train"):
        summary = train_stage.train(prepared, env / "model", env / "metrics.json", params,
                                    env / "ray_results")
    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [0]
    assert run.data.metrics["planned_epochs"] == 1 and run.data.metrics["elapsed_s"] > 0.06
    assert summary["best_epoch"] == 1 and load_model(env / "model")
    assert "stopped after 1 of 20 epochs: another would end after train.max_minutes 0.001" in caplog.text


@pytest.mark.slow          # a real Ray Train run killed or repeated: 80-110 s
def test_a_finished_run_is_trained_afresh_not_restored(prepared, env, local_ray):
    """The same params, data and code again (``dvc repro -f``): Ray must not restore the finished
    run (zero epochs, the old weights), and the new training gets an MLflow run of its own."""
    params = write_params(env / "params.yaml", epochs=1)
    for _ in range(2):
        train_stage.train(prepared, env / "model", env / "metrics.json", params, env / "ray_results")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 2 and runs[0].data.tags["ray_run_name"] == runs[1].data.tags["ray_run_name"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [0]
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.info.run_id in (env / "model" / "model.json").read_text()   # the output is the new one


def worker_pids() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


@pytest.mark.slow          # a real Ray Train run killed or repeated: 80-110 s
def test_killed_worker_resumes_from_its_checkpoint(prepared, env, local_ray):
    params = write_params(env / "params.yaml", epochs=4, max_failures=2)
    storage = env / "ray_results"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            # The snapshot is written once Ray has registered a reported checkpoint.
            snapshots = list(storage.glob("train-*/checkpoint_manager_snapshot.json"))
            if snapshots and "checkpoint_" in snapshots[0].read_text():
                procs = worker_pids()
                if procs:
                    procs[-1].send_signal(signal.SIGKILL)
                    killed.append(procs[-1].pid)
            time.sleep(0.2)

    threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    summary = train_stage.train(prepared, env / "model", env / "metrics.json", params, storage)

    assert killed, "no worker was killed"
    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])        # still one run
    starts = [m.value for m in client.get_metric_history(run.info.run_id, "start_epoch")]
    assert starts[0] == 0 and max(starts) >= 1                          # resumed, not restarted
    epochs = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_miou")})
    assert epochs == [0, 1, 2, 3]
    assert run.data.params["train.epochs"] == "4" and 1 <= summary["best_epoch"] <= 4


def test_a_cluster_started_here_trains_without_the_placement_group_cleaner_alone():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    def kinds(trainer_class):
        trainer = trainer_class(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
        return [type(callback) for callback in trainer._create_default_callbacks()]

    default = kinds(TorchTrainer)
    assert PlacementGroupCleanerCallback in default
    assert kinds(train_stage.without_placement_group_cleaner(TorchTrainer)) == [
        kind for kind in default if kind is not PlacementGroupCleanerCallback]


def test_a_second_local_cluster_in_one_process_spills_into_its_own_session(local_ray):
    """Ray writes the spilling folder it chose into the system config it was given; a second
    local cluster started by the same process (the test suite, a notebook, a benchmark) must
    not inherit the first one's folder."""
    ray.shutdown()
    train_stage.init_ray()
    node = ray._private.worker._global_node
    spill = json.loads(node._config["object_spilling_config"])["params"]["directory_path"]
    assert spill.startswith(node.get_session_dir_path())
    assert "object_spilling_config" not in train_stage.LOCAL_CLUSTER_SYSTEM_CONFIG


def test_too_many_cpus_per_worker_is_refused_before_it_hangs(prepared, env, local_ray):
    params = write_params(env / "params.yaml", cpus_per_worker=0.75)
    with pytest.raises(train_stage.TrainError, match="train.cpus_per_worker"):
        train_stage.train(prepared, env / "model", env / "metrics.json", params, env / "ray_results")


def test_workers_get_the_weights_folder_as_an_absolute_path(prepared, env, monkeypatch):
    # A relative $SEG_WEIGHTS_DIR (as in the README) means nothing in a Ray worker's cwd.
    (env / "weights").mkdir()
    monkeypatch.setenv("SEG_WEIGHTS_DIR", "weights")
    params = write_params(env / "params.yaml")
    cfg, model_cfg, loss_cfg = (load_params(m, params) for m in (TrainParams, ModelParams, LossParams))
    config = train_stage.worker_config(prepared, cfg, model_cfg, loss_cfg)
    assert config["env"] == {"SEG_WEIGHTS_DIR": str(env / "weights")}


def rows(iterator) -> list[int]:
    return [int(i) for batch in iterator.iter_batches(batch_format="numpy") for i in batch["id"]]


def test_a_materialised_split_gives_each_worker_a_fixed_equal_shard(local_ray):
    data = ray.data.range(10).materialize()
    shards = ShardConfig(datasets_to_split=["train"]).configure(
        {"train": data, "val": ray.data.range(4)}, world_size=2, worker_handles=None, worker_node_ids=None)
    train = [rows(s["train"]) for s in shards]
    assert sorted(train[0] + train[1]) == list(range(10)) and len(train[0]) == len(train[1]) == 5
    assert [rows(s["train"]) for s in shards] == train         # the same rows every epoch
    assert all(rows(s["val"]) == [0, 1, 2, 3] for s in shards)  # not split: every worker sees all


def test_a_lazy_split_keeps_ray_trains_streaming_split(local_ray):
    shards = ShardConfig(datasets_to_split=["train"]).configure(
        {"train": ray.data.range(10)}, world_size=2, worker_handles=None, worker_node_ids=None)
    assert all(isinstance(s["train"], StreamSplitDataIterator) for s in shards)
