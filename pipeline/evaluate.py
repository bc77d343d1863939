"""Stage ``evaluate``: the trained model on the test split at native resolution.

    python -m pipeline.evaluate --model models/train --data data/prepared \\
        --out evaluation --metrics metrics/evaluate.json --plots metrics/plots/evaluate

Every image is predicted whole (sliding-window tiles above ``evaluate.tile_above_pixels``,
optional flip and multi-scale TTA; ``pipeline.inference.predictor``); the model's task
(``pipeline.tasks``) counts and scores (for semantic segmentation one confusion matrix over
the split, ``pipeline.tasks.semantic_eval``). Outputs, for semantic segmentation:

- ``--metrics``: DVC metrics, the headline only (``headline``): the evaluation key, pixel
  accuracy, mIoU, mean Dice, frequency-weighted IoU, boundary mIoU, so that
  ``dvc metrics show`` and ``dvc metrics diff`` fit a 200-column terminal.
- ``--plots``: DVC plots data: ``per_class.json`` (one row per class: IoU, Dice, precision,
  recall, boundary IoU, pixel share) and ``confusion.json`` (the row-normalised confusion
  matrix, one row per truth/prediction pair).
- ``--out``: ``evaluate.json`` (the whole report, ``full_report``: what was scored, how, and
  every score), ``index.json`` (per-image scores; the sample and worst-per-class images; the
  files of each), ``confusion.json`` (raw counts), a palette PNG of every prediction, and
  image / truth / error / panel pictures of the selected images (``pipeline.viz.overlays``).

All of it is also logged to the training's MLflow run as one record keyed by the evaluation
key (``eval_key``, ``log_record``, ``pipeline.artifacts.records``): evaluating again with other
settings or on another test set adds a record and never overwrites one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import records
from pipeline.artifacts.model_dir import load_model, read_config
from pipeline.config import paths
from pipeline.config.params import EvaluateParams, load_params
from pipeline.data import shards
from pipeline.inference.refine import refinement_of
from pipeline.models.base import NO_REFINEMENT, SegmentationModel
from pipeline.tasks import task_of_data, task_of_model
from pipeline.tasks.base import EvaluateError, Task
from pipeline.utils.io import write_json_atomic

log = logging.getLogger("pipeline.evaluate")

# Settings that cannot change a score: left out of the evaluation key.
UNSCORED_SETTINGS = {"overlays", "threads"}
REFINEMENT_SETTINGS = {"postprocess", "crf", "grabcut"}    # in the key as the refinement chosen, if any


def split_version(data: Path, split: str) -> str:
    """sha256 of the split's shard files: equal test sets give equal versions."""
    digest = hashlib.sha256()
    for path in shards.shard_paths(data, split):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def settings(cfg: EvaluateParams) -> dict[str, Any]:
    """The evaluation settings that change a score (all but ``UNSCORED_SETTINGS``): a refinement
    with its own parameters only (``postprocess: {method, params}``), and none at all without
    one, so that evaluations from before refinements existed keep their keys."""
    out = cfg.model_dump(mode="json", exclude=UNSCORED_SETTINGS | REFINEMENT_SETTINGS)
    refinement = refinement_of(cfg)
    if refinement is not None and refinement.method != NO_REFINEMENT:
        out["postprocess"] = {"method": refinement.method, "params": dict(refinement.params)}
    return out


def eval_key(metrics: dict[str, Any], cfg: EvaluateParams) -> str:
    """Scores with equal keys are comparable: the same test set (``metrics["split_version"]``)
    scored with the same settings. 12 hex digits."""
    blob = json.dumps({"split_version": metrics["split_version"], "settings": settings(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def predictor_for(model: SegmentationModel, cfg: EvaluateParams, task: Task | None = None) -> Any:
    """What the model's task predicts with (``Task.predictor``), with ``cfg``'s inference settings."""
    task = task if task is not None else task_of_model(model)
    try:
        return task.predictor(model, flip_tta=cfg.flip_tta, tile_above_pixels=cfg.tile_above_pixels,
                              tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap, scales=cfg.scales,
                              postprocess=refinement_of(cfg))
    except ValueError as exc:          # settings the model's task cannot predict with
        raise EvaluateError(f"evaluate: {exc}") from None


def evaluate_split(model: SegmentationModel, data: Path, cfg: EvaluateParams,
                   task: Task | None = None) -> Any:
    """Predict every image of ``cfg.split`` and count, as the model's task does; nothing is written."""
    task = task if task is not None else task_of_model(model)
    return task.evaluate_split(model, data, cfg, predictor_for(model, cfg, task))


def full_report(ev: Any, data: Path, cfg: EvaluateParams, run_id: str | None = None,
                data_version: str | None = None, task: Task | None = None) -> dict[str, Any]:
    """Everything one evaluation found, as one JSON-able dict: what was scored (split, its
    data version, the run and its training data version), how (``settings``), under which
    key (``eval_key``), which score ranks models (``primary_metric``), and the task's scores
    (``Task.report``). What ``log_record`` records."""
    task = task if task is not None else task_of_data(data)[1]
    header = {"split": cfg.split, "split_version": split_version(data, cfg.split)}
    header["eval_key"] = eval_key(header, cfg)
    header |= {"settings": settings(cfg), "mlflow_run_id": run_id, "data_version": data_version,
               "primary_metric": task.primary_metric}
    return header | task.report(ev)


def headline(full: dict[str, Any], task: Task) -> dict[str, Any]:
    """The DVC metrics file: the key and the headline scores of a ``full_report``, no tables.
    Short, because ``dvc metrics show`` puts the columns of every metrics file in one table,
    which must fit a 200-column terminal (the image count and rate stay in the report)."""
    return {k: full[k] for k in ("eval_key", *task.headline_keys())}


def evaluate(model_dir: Path, data: Path, out: Path, metrics_path: Path, plots_dir: Path,
             params: Path = paths.PARAMS_FILE, track: bool = True) -> dict[str, Any]:
    """Score the model of ``model_dir`` on ``data``, write the outputs, record it on the
    model's MLflow run (``track``); returns the ``full_report``."""
    cfg = load_params(EvaluateParams, params)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = read_config(model_dir)
    model = load_model(model_dir)
    task = task_of_model(model)
    ev = evaluate_split(model, data, cfg, task)
    full = full_report(ev, data, cfg, config.get("mlflow_run_id"), config.get("data_version"), task)
    task.write_outputs(ev, data, cfg, out, full)
    plot_files = []
    for name, rows in task.plots(ev, full).items():
        write_json_atomic(Path(plots_dir) / name, rows)
        plot_files.append(Path(plots_dir) / name)
    write_json_atomic(metrics_path, headline(full, task))
    scores = ", ".join(f"{task.labels[k]} {full[k]:.4f}" for k in task.headline_keys()
                       if isinstance(full.get(k), float))
    log.info("%s: %s over %d images (%.1f images/s; key %s)", cfg.split, scores, full["images"],
             full["images_per_s"] or 0, full["eval_key"])
    if track:
        if full["mlflow_run_id"]:
            log_record(full["mlflow_run_id"], full, task, overlays_dir=Path(out), plot_files=plot_files)
        else:
            log.warning("the model has no MLflow run (trained with tracking off): not recorded in MLflow")
    return full


def log_record(run_id: str, report: dict[str, Any], task: Task, overlays_dir: Path | None = None,
               plot_files: Sequence[Path] = ()) -> None:
    """Record one evaluation (a ``full_report`` of ``task``) on MLflow run ``run_id`` under its
    key: metrics ``<split>/<key>/...``, the tag ``evaluation/<key>``, and under
    ``evaluations/<key>/`` the report (``evaluate.json``), ``plot_files`` (in ``plots/``)
    and the ``overlays_dir`` folder (as ``overlays/``) (``pipeline.artifacts.records``). Records of
    other keys are left as they are."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import tracking

    key = report["eval_key"]
    client = MlflowClient(tracking.tracking_uri())
    now = int(time.time() * 1000)
    tag, about = records.record_tag(report)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                      for k, v in records.flat_metrics(
                                          report, task.headline_keys(), task.per_class_keys).items()])
    client.set_tag(run_id, tag, about)
    client.log_dict(run_id, report, f"{records.artifact_dir(key)}/{records.REPORT_FILE}")
    for path in plot_files:
        client.log_artifact(run_id, str(path), records.artifact_dir(key, records.PLOTS))
    if overlays_dir is not None:
        client.log_artifacts(run_id, str(overlays_dir), records.artifact_dir(key, records.OVERLAYS))
    log.info("recorded on MLflow run %s as evaluation %s", run_id, key)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=paths.TRAIN_OUT)
    parser.add_argument("--data", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--out", type=Path, default=paths.EVAL_OUT)
    parser.add_argument("--metrics", type=Path, default=paths.EVAL_METRICS)
    parser.add_argument("--plots", type=Path, default=paths.EVAL_PLOTS)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        evaluate(args.model, args.data, args.out, args.metrics, args.plots, args.params)
    except (EvaluateError, FileNotFoundError) as exc:
        raise SystemExit(f"evaluate: {exc}") from None


if __name__ == "__main__":
    main()
