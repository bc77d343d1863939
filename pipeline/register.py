"""Stage ``register``: the evaluated model into the MLflow Model Registry, behind a gate.

    python -m pipeline.register --model models/train --metrics evaluation/evaluate.json \\
        --data data/prepared --out models/registry.json

1. The trained model, with the inference settings it was scored with (flip / multi-scale
   TTA, tiles: ``evaluate``'s) in its meta, is logged to its training's run and becomes a
   version of ``register.model_name``, tagged with the dataset version, params hash, git
   commit, the model's task, its test score (the task's primary metric: mIoU for semantic
   segmentation; tags ``test_score``, ``score_metric``), the evaluation key (test split
   version + evaluation settings) and
   those settings (``inference``). Its pyfunc predicts with them, so it reproduces its
   recorded score. Running the stage again for the same run and settings reuses that version.
2. With ``register.onnx`` an ONNX export (dynamic batch, height, width) is checked against
   PyTorch on a test image and logged to the same run; the version's ``onnx_uri`` tag
   points at it.
3. The gate: the version gets the alias (``champion``) when there is no champion yet, or
   when its test score is at least the champion's plus ``register.min_improvement``, decided
   inside the registry lock (``pipeline.artifacts.registry_lock``). Scores are only compared
   when they are the same metric, on the same test set with the same evaluation settings:
   when the champion was scored otherwise, it is evaluated again here on this test set first
   and that score recorded on it; a champion of another task (another metric) is never
   compared. A worse model stays registered without the alias. The decision and its reason go to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.artifacts.model_dir import read_config
from pipeline.artifacts.records import (
    EVAL_KEY_TAG,
    SCORE_METRIC_TAG,
    SCORE_TAG,
    SPLIT_VERSION_TAG,
    TASK_TAG,
    version_metric,
    version_score,
)
from pipeline.artifacts.registry_lock import LockTimeout, registry_lock
from pipeline.config import paths
from pipeline.config.params import EvaluateParams, RegisterParams, load_params
from pipeline.evaluate import eval_key
from pipeline.inference.refine import refinement_of
from pipeline.models.base import InferenceSettings
from pipeline.tasks import task_of_model, task_of_model_dir
from pipeline.tasks.base import EvaluateError, Task
from pipeline.utils.io import read_json, write_json_atomic

log = logging.getLogger("pipeline.register")

SOURCE_RUN_TAG = "mlflow_run_id"
SCORE_PREFIX = "score."          # score.<eval_key>: the version's test score under another evaluation key
INFERENCE_TAG = "inference"      # the inference settings baked into the version's model
INFERENCE_KEYS = tuple(f.name for f in fields(InferenceSettings))   # the params keys that set them
MAX_ROUNDS = 5                   # re-score a holder that moved meanwhile at most this often


class RegisterError(RuntimeError):
    """A model that cannot be registered (no MLflow run, no logged model, ...)."""


@dataclass
class Decision:
    model_name: str
    version: str
    alias: str
    promoted: bool
    reason: str
    score_metric: str            # which score ranks models: the task's primary metric
    test_score: float
    previous_champion: str | None = None
    previous_champion_score: float | None = None
    onnx_uri: str | None = None
    min_improvement: float = 0.0


def inference_settings(cfg: EvaluateParams) -> InferenceSettings:
    """The settings ``cfg`` predicts with (``pipeline.evaluate.predictor_for``)."""
    return InferenceSettings(**cfg.model_dump(include=set(INFERENCE_KEYS) - {"postprocess"}),
                             postprocess=refinement_of(cfg))


def inference_tag(cfg: EvaluateParams) -> str:
    """``inference_settings`` as canonical JSON (without a refinement, as before refinements
    existed, so that earlier versions' tags still match)."""
    settings = asdict(inference_settings(cfg))
    if settings["postprocess"] is None:
        del settings["postprocess"]
    return json.dumps(settings, sort_keys=True)


def params_hash(config: dict[str, Any]) -> str:
    blob = json.dumps({"model": config.get("model"), **config.get("params", {})}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def model_version(client, name: str, run_id: str, model_uri: str | Callable[[], str],
                  inference: str | None = None):
    """This run's version of ``name`` with these inference settings (``inference_tag``): the
    existing one, else a new one of ``model_uri`` (or of the URI it returns, when a function
    that logs the model: called only then)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Segmentation models trained by the pipeline")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise                # else another register created it since: use it
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(SOURCE_RUN_TAG) == run_id and mv.tags.get(INFERENCE_TAG) == inference:
            return mv
    uri = model_uri() if callable(model_uri) else model_uri
    tags = {SOURCE_RUN_TAG: run_id} | ({INFERENCE_TAG: inference} if inference is not None else {})
    # A logged model's URI (models:/m-<id>) names it by id; a tracking server wants that id too.
    model_id = uri.split("/")[1] if uri.startswith("models:/m-") else None
    return client.create_model_version(name, uri, run_id=run_id, tags=tags, model_id=model_id)


def log_with_settings(run_id: str, model_dir: Path, cfg: EvaluateParams) -> str:
    """Log ``model_dir`` to ``run_id`` as a pyfunc whose meta records the inference settings
    ``cfg`` scores with, so that the registered model predicts as it was scored; its URI."""
    import mlflow

    from pipeline.artifacts import mlflow_model
    from pipeline.artifacts.model_dir import CONFIG_FILE

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(model_dir, folder)
        config = read_config(folder)
        config["meta"]["inference"] = asdict(inference_settings(cfg))
        write_json_atomic(folder / CONFIG_FILE, config)
        with mlflow.start_run(run_id=run_id):
            return mlflow_model.log_model(folder, name="registered")


def current_champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def rescore(name: str, version, data: Path, cfg: EvaluateParams) -> tuple[Task, dict[str, Any]]:
    """(task, full report): a registered ``version`` evaluated here with ``cfg`` on ``data``
    (``evaluate.full_report``), recorded nowhere yet (``record_rescore``). Raises
    ``EvaluateError`` when the model and data cannot be evaluated together."""
    import mlflow.pyfunc

    from pipeline.evaluate import evaluate_split, full_report

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model().model
    task = task_of_model(model)
    report = full_report(evaluate_split(model, data, cfg, task), data, cfg, run_id=version.run_id, task=task)
    return task, report


def record_rescore(client, name: str, version, task: Task, full: dict[str, Any], key: str, split: str,
                   settings: str) -> None:
    """Record a ``rescore`` of ``version``: the whole evaluation on its run under its key
    (``evaluate.log_record``) and the score on the version (``record_score``). Called holding
    the registry lock: two registers re-scoring one champion write the same new tags, and
    MLflow's SQL stores refuse the second of two concurrent first writes of a tag (a unique
    constraint, answered as a bad request)."""
    from pipeline.evaluate import log_record

    if version.run_id:
        log_record(version.run_id, full, task)
    score = (task.primary_metric, full[task.primary_metric])
    record_score(client, name, version, key, score, split, settings)


def recorded_score(version, key: str) -> tuple[str, float] | None:
    """(metric, value): the test score recorded on a registry ``version`` under evaluation key
    ``key``, if any."""
    tags = version.tags
    if tags.get(EVAL_KEY_TAG) == key and (score := version_score(tags)) is not None:
        return score
    return (version_metric(tags), float(tags[SCORE_PREFIX + key])) if SCORE_PREFIX + key in tags else None


def record_score(client, name: str, version, key: str, score: tuple[str, float], split: str,
                 settings: str) -> None:
    """Keep a re-score (metric, value) on the version, so that later gates on this test set
    reuse it.

    ``score.<key>`` and ``score_metric`` always; the headline ``test_score`` / ``eval_key`` /
    ``split_version`` tags move to it only when it was predicted with the version's own
    inference settings (its ``inference`` tag), so the headline stays a score its pyfunc
    reproduces."""
    metric, value = score
    client.set_model_version_tag(name, version.version, SCORE_PREFIX + key, repr(value))
    client.set_model_version_tag(name, version.version, SCORE_METRIC_TAG, metric)
    if version.tags.get(INFERENCE_TAG) == settings:
        for tag, text in ((SCORE_TAG, repr(value)), (EVAL_KEY_TAG, key), (SPLIT_VERSION_TAG, split)):
            client.set_model_version_tag(name, version.version, tag, text)


def decide(client, name: str, alias: str, candidate, task: Task, score: float, key: str, data: Path,
           cfg: EvaluateParams, min_improvement: float, split: str) -> Decision:
    """Give ``candidate`` the alias if it beats the holder by ``min_improvement``; say why.

    The holder is read, compared and the alias set inside the registry lock
    (``pipeline.artifacts.registry_lock``), so concurrent registers promote one at a time. A holder
    with no score for this test set and these settings is re-evaluated outside the lock
    (minutes on a real test set), the score recorded on it inside the lock, and the gate tried
    again."""
    decision = Decision(name, str(candidate.version), alias, False, "", task.primary_metric, score,
                        min_improvement=min_improvement)
    rescored: set[str] = set()
    pending = None                  # (version, its task, its re-evaluation) to record
    for _ in range(MAX_ROUNDS):
        with registry_lock(client, name):
            if pending is not None:
                record_rescore(client, name, *pending, key, split, inference_tag(cfg))
                rescored.add(str(pending[0].version))
                pending = None
            champion = current_champion(client, name, alias)
            held = None if champion is None else recorded_score(champion, key)
            if champion is None or str(champion.version) == str(candidate.version) or held is not None:
                _compare(decision, task, champion, held, min_improvement,
                         "re-evaluated on this test set," if champion is not None
                         and str(champion.version) in rescored else "its recorded")
                if decision.promoted:
                    client.set_registered_model_alias(name, alias, candidate.version)
                return decision
        try:
            pending = (champion, *rescore(name, champion, data, cfg))
        except EvaluateError as exc:
            # Not comparable on this test set (e.g. other classes): no evidence the candidate
            # is better, so the holder keeps the alias until a person moves it.
            decision.previous_champion = str(champion.version)
            decision.reason = (f"{alias} version {champion.version} could not be re-evaluated on this "
                               f"test set ({exc}), so the two cannot be compared; version "
                               f"{candidate.version} is registered without @{alias} (set the alias by hand, "
                               f"or use another register.model_name for another dataset)")
            return decision
    raise RegisterError(f"@{alias} of {name} moved {MAX_ROUNDS} times while this register ran")


def _compare(decision: Decision, task: Task, champion, held: tuple[str, float] | None,
             min_improvement: float, how: str) -> None:
    alias, score = decision.alias, decision.test_score
    if champion is None:
        decision.promoted, decision.reason = True, f"no {alias} yet"
        return
    if str(champion.version) == decision.version:
        decision.promoted, decision.reason = True, f"already the {alias}"
        return
    metric, value = held
    decision.previous_champion = str(champion.version)
    if metric != decision.score_metric:
        # Another task's champion: its score is another metric, so there is nothing to compare.
        decision.reason = (f"{alias} version {champion.version} is scored by {metric}, this model by "
                           f"{decision.score_metric} (task {champion.tags.get(TASK_TAG, '?')} vs "
                           f"{task.name}), so "
                           f"the two cannot be compared; version {decision.version} is registered without "
                           f"@{alias} (use another register.model_name for another task)")
        return
    decision.previous_champion_score = value
    label = task.labels.get(metric, metric)
    # A margin below float rounding of the two recorded scores counts as met.
    decision.promoted = score - value >= min_improvement - 1e-9
    verb = "beats" if decision.promoted else "does not beat"
    decision.reason = (f"test {label} {score:.4f} {verb} {alias} version {champion.version} ({how} test "
                       f"{label} {value:.4f}) by at least register.min_improvement {min_improvement:.4f} "
                       f"(difference {score - value:+.4f})")


def log_onnx(run_id: str, model_dir: Path, data: Path, cfg: RegisterParams, split: str) -> str:
    """Export, check against PyTorch on the first image of ``split``, log; returns the URI."""
    import mlflow
    import onnx

    from pipeline.artifacts.model_dir import load_model
    from pipeline.artifacts.onnx_export import OnnxExportError, export_onnx, max_difference
    from pipeline.data import shards
    from pipeline.inference.tensors import to_tensor

    model = load_model(model_dir)
    _, image, _ = next(shards.iter_samples(data, split))
    x = to_tensor([image], model.meta.mean, model.meta.std)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(model, Path(tmp) / "model.onnx", cfg.onnx_opset)
        except OnnxExportError as exc:
            raise RegisterError(str(exc)) from exc
        diff = max_difference(path, model, x)
        if diff > 1e-3:
            raise RegisterError(f"the ONNX export differs from PyTorch by {diff:.2e} on a test image")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(path)), name="onnx", save_as_external_data=False)
    log.info("ONNX export logged (max logit difference %.1e on a %dx%d test image)", diff, *image.shape[:2])
    return info.model_uri


def register(model_dir: Path, metrics_path: Path, data: Path, out: Path,
             params: Path = paths.PARAMS_FILE) -> Decision:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking

    cfg = load_params(RegisterParams, params)
    eval_cfg = load_params(EvaluateParams, params)
    config = read_config(model_dir)
    task = task_of_model_dir(model_dir)
    metrics = read_json(metrics_path)
    run_id = config.get("mlflow_run_id")
    if not run_id:
        raise RegisterError(f"{model_dir}: the model has no MLflow run (trained with tracking off)")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = MlflowClient(tracking.tracking_uri())
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise RegisterError(f"MLflow run {run_id} of {model_dir} is not in "
                            f"{tracking.tracking_uri()}") from exc
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise RegisterError(f"MLflow run {run_id} logged no model (no model_uri tag)")
    if metrics.get("mlflow_run_id") != run_id:
        raise RegisterError(f"{metrics_path} evaluated run {metrics.get('mlflow_run_id')}, not {run_id}")
    if cfg.onnx and not task.onnx_export:
        raise RegisterError(f"register.onnx: models of the {task.name} task have no checked ONNX export "
                            "here; set register.onnx: false")
    if metrics.get("primary_metric") != task.primary_metric:
        raise RegisterError(f"{metrics_path}: primary_metric is {metrics.get('primary_metric')!r}, but the "
                            f"model's task {task.name} ranks by {task.primary_metric!r} (evaluate again)")
    # The score that ranks models: the task's primary one (mIoU for semantic segmentation).
    score, key = float(metrics[task.primary_metric]), eval_key(metrics, eval_cfg)
    version = model_version(client, cfg.model_name, run_id,
                            lambda: log_with_settings(run_id, model_dir, eval_cfg), inference_tag(eval_cfg))
    tags = {"data_version": config.get("data_version"), "params_hash": params_hash(config),
            "git_commit": run.data.tags.get("git_commit", "unknown"), TASK_TAG: task.name,
            SCORE_METRIC_TAG: task.primary_metric, SCORE_TAG: repr(score), EVAL_KEY_TAG: key,
            SCORE_PREFIX + key: repr(score), SPLIT_VERSION_TAG: metrics["split_version"],
            "dvc_exp": run.data.tags.get("dvc_exp", "")}
    if cfg.onnx and "onnx_uri" not in version.tags:
        tags["onnx_uri"] = log_onnx(run_id, model_dir, data, cfg, eval_cfg.split)
    for k, v in tags.items():
        client.set_model_version_tag(cfg.model_name, version.version, k, str(v))
    decision = decide(client, cfg.model_name, cfg.alias, version, task, score, key, data, eval_cfg,
                      cfg.min_improvement, metrics["split_version"])
    decision.onnx_uri = tags.get("onnx_uri", version.tags.get("onnx_uri"))
    write_json_atomic(out, asdict(decision))
    log.info("%s version %s: %s; %s", cfg.model_name, version.version,
             f"now @{cfg.alias}" if decision.promoted else f"registered, not @{cfg.alias}", decision.reason)
    return decision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=paths.TRAIN_OUT)
    parser.add_argument("--metrics", type=Path, default=paths.EVAL_REPORT,
                        help="the evaluate stage's whole report")
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--out", type=Path, default=paths.REGISTER_OUT)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        register(args.model, args.metrics, args.data, args.out, args.params)
    except (RegisterError, LockTimeout, FileNotFoundError) as exc:
        raise SystemExit(f"register: {exc}") from None


if __name__ == "__main__":
    main()
