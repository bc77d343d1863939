"""Stage ``train``: Ray Train (TorchTrainer + Ray Data) around the plain loop in
``pipeline.engine.loop``, one MLflow run per training, the best checkpoint as output.

    python -m pipeline.train --data data/prepared --out models/train --metrics metrics/train.json \\
        --plots metrics/plots/train

``--metrics`` holds the headline (best validation mIoU and pixel accuracy, best epoch, ...);
the best epoch's per-class validation IoU goes to ``--plots``/``val_iou.json``.

Same code on one CPU, one GPU or a cluster: with ``RAY_ADDRESS`` set it joins that
cluster, otherwise it starts a local one. A re-run with the same params, data and
training code (``pipeline.engine.run_identity``) after a crash resumes from the latest checkpoint
in ``ray_results/<run name>`` and continues the same MLflow run; a run that finished is
never resumed: running it again (``dvc repro -f``) trains afresh in a new MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts.model_dir import CONFIG_FILE, WEIGHTS_FILE
from pipeline.artifacts.storage import Location, Storage, StorageError, publish_dir, storage_from_env
from pipeline.artifacts.storage import check as check_storage
from pipeline.config import paths
from pipeline.config.params import LossParams, ModelParams, ParamsError, TrainParams, load_params
from pipeline.data import shards
from pipeline.engine import allocator, run_identity
from pipeline.engine.ingest import ShardConfig
from pipeline.engine.progress import ProgressFollower
from pipeline.engine.worker import META_FILE, STATE_FILE, train_worker
from pipeline.losses.terms import resolve_class_weights
from pipeline.models import registry as models
from pipeline.models.base import ModelMeta
from pipeline.models.weights import ENCODER_WEIGHT_FILES, WeightsUnavailableError
from pipeline.tasks import task_of_data
from pipeline.tasks.base import Task
from pipeline.utils import console
from pipeline.utils.io import read_json, write_json_atomic

log = logging.getLogger("pipeline.train")

RUN_ID_FILE = "mlflow_run_id"      # in a run's folder: the MLflow run it continues
PREPARED_PREFIX = "prepared"       # in the shared storage: the published shards ...
WEIGHTS_PREFIX = "weights"         # ... and pretrained weight files



class TrainError(RuntimeError):
    """A training that cannot start or did not produce a model."""


def data_version(data: Path) -> str:
    """DVC's hash of the prepared data from dvc.lock, else the raw data digest of the card."""
    lock = Path("dvc.lock")
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("prepare", {}).get("outs", []):
            if Path(out["path"]) == Path(data) and "md5" in out:
                return out["md5"]
    return "raw-sha256:" + read_json(Path(data) / paths.CARD_JSON).get("raw_tree_sha256", "unknown")


def run_name(sections: dict[str, dict], version: str, task: Task) -> str:
    """Equal params, data and training code (a plug-in task's too) give the same name, which
    is what lets a re-run after a crash resume (``pipeline.engine.run_identity``)."""
    return run_identity.run_name(sections, version, task_code=run_identity.task_code_digest(task))


def start_afresh_if_finished(run_dir: Location) -> bool:
    """A finished run is never resumed: its folder (checkpoints, MLflow run id) is cleared so
    that the same identity trains again from scratch (``dvc repro -f``). True if cleared."""
    if not run_identity.is_complete(run_dir):
        return False
    log.info("run %s finished before: training afresh", run_dir.name)
    run_dir.delete()
    return True


def open_run(client, run_id_file: Location, run_name: str, tags: dict[str, str]) -> str:
    """The MLflow run of this training: the one recorded in ``run_id_file`` (in the run's
    folder) when it is still there (a training resumed after a crash continues its run), else a
    new one."""
    import mlflow
    from mlflow.entities import RunStatus

    from pipeline.artifacts import tracking

    if run_id_file.is_file():
        run_id = run_id_file.read_text().strip()
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return run_id
        except mlflow.exceptions.MlflowException:
            pass
    run = client.create_run(tracking.experiment_id(client), run_name=run_name, tags=tags)
    run_id_file.write_text(run.info.run_id)
    return run.info.run_id


def shared_storage() -> Storage | None:
    """The cluster's shared storage (``$SEG_STORAGE_URI``), checked before MLflow and Ray start;
    None: the repository's folders."""
    store = storage_from_env()
    if store is not None:
        check_storage(store)
    return store


def runs_location(store: Storage | None, local: Path) -> Location:
    """Where Ray Train keeps the runs: ``ray_results/`` of the shared storage, else ``local``."""
    return store.location(paths.RAY_RESULTS.name) if store is not None else Location.local(local)


def shard_sources(data: Path, store: Storage | None) -> tuple[dict[str, list[str]], Any]:
    """The train and validation shards as Ray Data reads them, and the filesystem they are on:
    the local files, or their copy in the shared storage (published once per content) that every
    node can read."""
    files = {split: shards.shard_paths(data, split) for split in ("train", "val")}
    if store is None:
        return {split: [str(p) for p in found] for split, found in files.items()}, None
    published = publish_dir(data, [p for found in files.values() for p in found], store, PREPARED_PREFIX)
    log.info("shards in %s", published.uri())
    return {split: [published.child(str(p.relative_to(data))).path for p in found]
            for split, found in files.items()}, published.fs


def shipped_weights(store: Storage | None, model_cfg: ModelParams) -> Location | None:
    """With shared storage and ``$SEG_WEIGHTS_DIR``: the registered weight files of that folder
    published to the storage, for workers on nodes that do not have the folder."""
    folder = paths.weights_dir()
    if store is None or folder is None or model_cfg.encoder_weights is None:
        return None
    files = [folder / f.name for f in ENCODER_WEIGHT_FILES.values() if (folder / f.name).is_file()]
    return publish_dir(folder, files, store, WEIGHTS_PREFIX) if files else None


def thing_classes(classes: dict) -> list[int]:
    """The indices of the classes classes.json marks as countable things (``isthing``: instance
    and panoptic data; semantic data has none)."""
    return [c for c, thing in enumerate(classes.get("isthing", [])) if thing]


def preflight(data: Path, model_cfg: ModelParams, loss_cfg: LossParams) -> None:
    """Refuse, on the driver and before MLflow and Ray start, a configuration the workers
    could not train: inside Ray a worker's exception is a worker failure, which
    ``train.max_failures`` restarts would repeat and bury in tracebacks.

    Builds the model once without pretrained weights (``model.arch``, ``encoder_name``,
    ``kwargs``) and the loss with its class weights, raising ``TrainError`` with their
    message naming the key; then makes sure the encoder's pretrained weights can be had
    (``WeightsUnavailableError``, ``pipeline.models.weights``).
    """
    classes = read_json(data / paths.CLASSES_FILE)
    num_classes = classes["num_classes"]
    try:
        _, task = task_of_data(data)
        meta = ModelMeta(class_names=classes["names"], thing_classes=thing_classes(classes))
        models.build_model(model_cfg.without_pretrained_weights(), num_classes, meta)
        weights = resolve_class_weights(loss_cfg, read_json(data / paths.CARD_JSON), num_classes)
        task.build_loss(loss_cfg, num_classes, classes["ignore_index"], weights)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    models.ensure_weights(model_cfg)


def worker_config(data: Path, cfg: TrainParams, model_cfg: ModelParams, loss_cfg: LossParams,
                  store: Storage | None = None) -> dict:
    classes = read_json(data / paths.CLASSES_FILE)
    card = read_json(data / paths.CARD_JSON)
    mean, std = models.normalisation(model_cfg)
    weights = paths.weights_dir()   # checked here, and handed on absolute: workers run elsewhere
    shipped = shipped_weights(store, model_cfg)
    return {
        # The workers fetch shipped weights into a folder of their own (engine.worker).
        "env": {paths.ENV_WEIGHTS_DIR: str(weights)} if weights is not None and shipped is None else {},
        "weights": shipped,
        "train": cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"),
        "loss": loss_cfg.model_dump(mode="json"),
        "num_classes": classes["num_classes"], "ignore_index": classes["ignore_index"],
        "class_names": classes["names"], "palette": classes["palette"],
        "class_weights": resolve_class_weights(loss_cfg, card, classes["num_classes"]),
        "mean": list(mean), "std": list(std), "n_train": card["splits"]["train"]["images"],
        "task": task_of_data(data)[0],
        "thing_classes": thing_classes(classes),
    }


def scaling(cfg: TrainParams):
    """ScalingConfig from params; checks that the workers leave Ray Data a CPU."""
    import ray
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    use_gpu = gpus > 0 if cfg.use_gpu == "auto" else cfg.use_gpu
    if use_gpu and gpus < cfg.num_workers:
        raise TrainError(f"train.use_gpu: {cfg.num_workers} workers need {cfg.num_workers} GPUs, "
                         f"the cluster has {gpus:g}")
    cpus = resources.get("CPU", 0)
    # Ray Data's read tasks each need one whole CPU on some node.
    if cfg.num_workers * cfg.cpus_per_worker > cpus - 1:
        raise TrainError(
            f"train.num_workers x train.cpus_per_worker = {cfg.num_workers} x {cfg.cpus_per_worker:g} "
            f"leaves less than one CPU of the cluster's {cpus:g} for Ray Data, whose reading "
            "would then wait forever; lower train.cpus_per_worker (fractions are fine)"
        )
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                         placement_strategy=cfg.placement_strategy)


# A cluster of this one machine has no preemptible nodes to watch, and every idle Ray
# helper process costs about 1 % of a core (a 100 Hz timer in each), which a small
# machine takes from training. Set only for a local cluster this stage starts, and only
# where the caller has not set them.
LOCAL_CLUSTER_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",    # no PreemptionWatcher actor
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",   # log monitor lists the log folder every 0.5 s, not 0.1 s
    "RAY_USAGE_STATS_ENABLED": "0",                # no usage-stats reporting (nowhere to send it)
}
LOCAL_CLUSTER_SYSTEM_CONFIG = {
    "num_workers_soft_limit": 0,                   # idle worker processes exit after 1 s
    # Less of the cluster's own periodic work competing with the training workers for the
    # cores (README, "Training"): no Prometheus metrics export from every process, and task
    # events (the dashboard's task table) flushed every 10 s rather than every second.
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 10_000,
}
_started_here = False    # whether init_ray started the local cluster (not joined one)


def init_ray(level: str = console.DEFAULT_RAY_LOG_LEVEL) -> None:
    """Join ``$RAY_ADDRESS`` if set, else start a local cluster bound to 127.0.0.1; Ray's
    own logging, here and in its processes, at ``level`` (``console.ray_log_level``)."""
    import ray
    from ray.data import DataContext

    global _started_here
    process_env = console.ray_process_env(level)
    if not ray.is_initialized():
        _started_here = False
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True, logging_level=level, runtime_env={"env_vars": process_env})
        else:
            # A local cluster's processes inherit this process's environment.
            for name, value in (LOCAL_CLUSTER_ENV | process_env).items():
                os.environ.setdefault(name, value)
            console.choose_ray_auth_mode()
            # No dashboard: its only client here was Ray Train's placement-group cleaner,
            # which a cluster started here runs without (without_placement_group_cleaner).
            # address "local": a new cluster even where an earlier `ray start` left its address
            # behind (/tmp/ray/ray_current_cluster), which ray.init() would otherwise try to join.
            # A copy: Ray writes the cluster's spilling folder into the dict it is given,
            # which a second cluster started by this process would otherwise inherit.
            ray.init(address="local", include_dashboard=False, log_to_driver=True,
                     logging_level=level, _system_config=dict(LOCAL_CLUSTER_SYSTEM_CONFIG))
            _started_here = True
    # Ray Data configured this process's logger when it was imported, before the above.
    logging.getLogger("ray.data").setLevel(level)
    # Ray Data draws bars where its process has a terminal (this driver on one) and
    # elsewhere logs its progress at INFO, hidden unless asked for; ray_tqdm would draw the
    # workers' bars through this driver's console, terminal or not.
    DataContext.get_current().use_ray_tqdm = False


def without_placement_group_cleaner(trainer_class: type) -> type:
    """``trainer_class`` without Ray Train's placement-group cleaner, for a cluster this
    stage started. The cleaner is a detached actor that asks the State API (through the
    dashboard) every second whether the controller is alive, to remove the run's placement
    groups should it die; a cluster started here is torn down when this process ends, its
    placement groups with it, so the cleaner would only take CPU from the workers."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LocalClusterTrainer(trainer_class):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    LocalClusterTrainer.__name__ = LocalClusterTrainer.__qualname__ = f"Local{trainer_class.__name__}"
    return LocalClusterTrainer


def fit(
    data: Path, cfg: TrainParams, model_cfg: ModelParams, loss_cfg: LossParams,
    storage: Path = paths.RAY_RESULTS, track: bool = True,
):
    """Run the training; returns (Ray Result, MLflow run id or None, run name)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    preflight(data, model_cfg, loss_cfg)
    store = shared_storage()
    config = worker_config(data, cfg, model_cfg, loss_cfg, store)
    sections = {"train": config["train"], "model": config["model"], "loss": config["loss"]}
    version = data_version(data)
    task = task_of_data(data)[1]
    name = run_name(sections, version, task)
    runs = runs_location(store, storage)
    run_dir = runs.child(name)
    start_afresh_if_finished(run_dir)
    level = console.ray_log_level()
    # Rank 0 writes one record per epoch; this driver prints each once (pipeline.engine.progress).
    progress = run_dir.child(paths.PROGRESS_DIR)
    config["progress"] = progress
    config["ray_log_level"] = level
    run_id = None
    if track:
        from mlflow.tracking import MlflowClient

        from pipeline.artifacts import tracking

        client = MlflowClient(tracking.tracking_uri())
        tags = {"data_version": version, "git_commit": tracking.git_commit(), "ray_run_name": name,
                "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
        # In MLflow the run carries the DVC experiment's name when there is one.
        display = os.environ.get("DVC_EXP_NAME") or name
        run_id = open_run(client, run_dir.child(RUN_ID_FILE), display, tags)
        tracking.log_params(client, run_id, sections)
        config["mlflow"] = {"tracking_uri": tracking.tracking_uri(), "run_id": run_id}

    init_ray(level)
    if _started_here:
        # The cluster's processes descend from this one: the workers lower them (engine.priority).
        config["local_cluster_root"] = os.getpid()
    sources, filesystem = shard_sources(data, store)
    datasets = {
        split: ray.data.read_parquet(files, filesystem=filesystem)
        .select_columns(["image", *task.target_columns])
        for split, files in sources.items()
    }
    if cfg.materialize:
        # Read once into Ray's object store (spilled to disk when it does not fit): each
        # epoch then streams the blocks to the workers without new read tasks.
        datasets["train"] = datasets["train"].materialize()
    trainer_class = without_placement_group_cleaner(TorchTrainer) if _started_here else TorchTrainer
    trainer = trainer_class(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling(cfg),
        run_config=RunConfig(
            name=name, storage_path=runs.path,
            storage_filesystem=runs.fs if store is not None and store.remote else None,
            # Read by the C library when a worker process starts (pipeline.engine.allocator).
            worker_runtime_env={"env_vars": allocator.worker_env()} if cfg.keep_freed_memory else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # The best checkpoint by validation mIoU, plus the latest (kept for resume).
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_order="max",
                                               checkpoint_score_attribute=score_key(data)),
            # Ray Train's own messages (worker group set-up, every report) in its controller and workers.
            logging_config=LoggingConfig(log_level=level),
        ),
        datasets=datasets,
        # Validation is not split: each worker evaluates every world-th row of it.
        dataset_config=ShardConfig(datasets_to_split=["train"]),
    )
    budget = f" or {cfg.max_minutes:g} minutes, whichever ends first" if cfg.max_minutes is not None else ""
    log.info("training %s on %d worker(s), %d epochs%s (Ray run %s)", model_cfg.arch, cfg.num_workers,
             cfg.epochs, budget, name)
    epochs = console.EpochConsole(cfg.epochs)
    try:
        with ProgressFollower(progress, epochs.show, interval_s=2.0 if store and store.remote else 0.5):
            result = trainer.fit()
    finally:
        epochs.close()
    return result, run_id, name


def score_key(data: Path) -> str:
    """The reported metric that ranks epochs: the task's primary validation score (``val_miou``)."""
    return f"val_{task_of_data(data)[1].primary_metric}"


def export_best(result, out: Path, extra: dict[str, Any], score: str) -> dict[str, Any]:
    """Write the checkpoint with the highest ``score`` as a saved model folder
    (``pipeline.artifacts.model_dir``)."""
    if not result.best_checkpoints:
        raise TrainError("the training reported no checkpoint")
    checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1][score])
    out = Path(out)
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model_json = read_json(Path(d) / META_FILE)
    torch.save(state["model"], staging / WEIGHTS_FILE)
    write_json_atomic(staging / CONFIG_FILE, model_json | extra | {"metrics": metrics})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return metrics


def write_summary(best: dict[str, Any], images_per_s: float, metrics_path: Path,
                  plots_dir: Path, task: Task) -> dict[str, Any]:
    """The DVC metrics of a training, from the best epoch's reported ``best`` metrics: the
    task's headline to ``metrics_path`` (returned) and its plots (for semantic segmentation the
    per-class validation IoU) to ``plots_dir``. The headline is short because ``dvc metrics
    show`` puts the columns of every metrics file in one table, which must fit a 200-column
    terminal (the epochs are a param)."""
    headline, plots = task.training_summary(best)
    summary = headline | {"train_images_per_s": images_per_s}
    for name, rows in plots.items():
        write_json_atomic(Path(plots_dir) / name, rows)
    write_json_atomic(metrics_path, summary)
    return summary


def train(data: Path, out: Path, metrics_path: Path, params: Path = paths.PARAMS_FILE,
          storage: Path = paths.RAY_RESULTS, track: bool = True,
          plots_dir: Path = paths.TRAIN_PLOTS) -> dict[str, Any]:
    """Train, export the best model to ``out``; returns the summary written to
    ``metrics_path`` (and the best epoch's per-class IoU to ``plots_dir``)."""
    cfg = load_params(TrainParams, params)
    model_cfg = load_params(ModelParams, params)
    loss_cfg = load_params(LossParams, params)
    result, run_id, name = fit(data, cfg, model_cfg, loss_cfg, storage, track)
    extra = {"data_version": data_version(data), "mlflow_run_id": run_id, "ray_run_name": name,
             "params": {"train": cfg.model_dump(mode="json"), "loss": loss_cfg.model_dump(mode="json")}}
    _, task = task_of_data(data)
    best = export_best(result, out, extra, score_key(data))
    last = result.metrics
    if int(last["epoch"]) + 1 < cfg.epochs:
        log.info("stopped after %d of %d epochs: another would end after train.max_minutes %g "
                 "(%.1f minutes of epochs so far)", int(last["epoch"]) + 1, cfg.epochs, cfg.max_minutes,
                 last["elapsed_s"] / 60)
    # The last epoch's (warm) rate; Result.metrics_dataframe holds only the kept checkpoints.
    summary = write_summary(best, float(result.metrics["train_images_per_s"]), metrics_path, plots_dir, task)
    best_key = f"best_val_{task.primary_metric}"
    if run_id is not None:
        _finish_mlflow(run_id, out, metrics_path, {best_key: summary[best_key]})
    run_dir = runs_location(storage_from_env(), storage).child(name)
    run_identity.mark_complete(run_dir, {"mlflow_run_id": run_id, "out": str(out)})
    log.info("best validation %s %.4f at epoch %d -> %s", task.primary_label, summary[best_key],
             summary["best_epoch"], out)
    return summary


def _finish_mlflow(run_id: str, model_dir: Path, metrics_path: Path, best: dict[str, float]) -> None:
    import mlflow

    from pipeline.artifacts import tracking
    from pipeline.artifacts.mlflow_model import log_model

    mlflow.set_tracking_uri(tracking.tracking_uri())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(best)
        mlflow.log_artifact(str(metrics_path))
        mlflow.log_artifact(str(Path(model_dir) / CONFIG_FILE))
        mlflow.set_tag("model_uri", log_model(model_dir))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--out", type=Path, default=paths.TRAIN_OUT)
    parser.add_argument("--metrics", type=Path, default=paths.TRAIN_METRICS)
    parser.add_argument("--plots", type=Path, default=paths.TRAIN_PLOTS)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    parser.add_argument("--storage", type=Path, default=paths.RAY_RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    console.quiet_mlflow_progress()
    args = parse_args(argv)
    try:
        train(args.data, args.out, args.metrics, args.params, args.storage, plots_dir=args.plots)
    except (TrainError, ParamsError, WeightsUnavailableError, StorageError) as exc:
        # Configuration errors, found before Ray starts: the message, not a traceback.
        raise SystemExit(f"train: {exc}") from None


if __name__ == "__main__":
    main()
