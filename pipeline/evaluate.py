"""Stage ``evaluate``: the trained model on the test split at native resolution.

    python -m pipeline.evaluate --model models/train --data data/prepared \\
        --out evaluation --metrics metrics/evaluate.json --plots metrics/plots

Every image is predicted whole (sliding-window tiles above ``evaluate.tile_above_pixels``,
optional flip and multi-scale TTA; ``pipeline.inference.predictor``). One confusion matrix
summed over the split gives the scores (``pipeline.metrics.confusion``): the ignore label
is left out, and a class absent from both truth and prediction is NaN (``null`` in the JSON
files) and left out of the means. Outputs:

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
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import records
from pipeline.artifacts.model_dir import load_model, read_config
from pipeline.config import paths
from pipeline.config.params import EvaluateParams, load_params
from pipeline.data import shards
from pipeline.inference.predictor import Predictor
from pipeline.metrics.boundary import BoundaryIoU
from pipeline.metrics.confusion import confusion_matrix, segmentation_metrics
from pipeline.models.base import SegmentationModel
from pipeline.utils.io import read_json, write_json_atomic
from pipeline.viz import overlays

log = logging.getLogger("pipeline.evaluate")

INDEX_FILE = "index.json"
COUNTS_FILE = "confusion.json"
REPORT_FILE = records.REPORT_FILE
PER_CLASS_PLOT = "per_class.json"
CONFUSION_PLOT = "confusion.json"
# Settings that cannot change a score: left out of the evaluation key.
UNSCORED_SETTINGS = {"overlays", "threads"}
VIEWS = {"image": ("images", ".jpg"), "truth": ("truth", ".png"), "prediction": ("predictions", ".png"),
         "error": ("errors", ".png"), "panel": ("panels", ".jpg")}


class EvaluateError(RuntimeError):
    """A model and dataset that cannot be evaluated together."""


@dataclass
class Evaluation:
    """What one pass over a split found."""

    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    confusion: np.ndarray                     # (C, C) int64, rows = truth
    boundary_iou: list[float]
    ids: list[str] = field(default_factory=list)
    image_confusions: list[np.ndarray] = field(default_factory=list)
    predictions: list[bytes] = field(default_factory=list)    # palette PNG per image
    seconds: float = 0.0


def split_version(data: Path, split: str) -> str:
    """sha256 of the split's shard files: equal test sets give equal versions."""
    digest = hashlib.sha256()
    for path in shards.shard_paths(data, split):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def settings(cfg: EvaluateParams) -> dict[str, Any]:
    """The evaluation settings that change a score (all but ``UNSCORED_SETTINGS``)."""
    return cfg.model_dump(mode="json", exclude=UNSCORED_SETTINGS)


def eval_key(metrics: dict[str, Any], cfg: EvaluateParams) -> str:
    """Scores with equal keys are comparable: the same test set (``metrics["split_version"]``)
    scored with the same settings. 12 hex digits."""
    blob = json.dumps({"split_version": metrics["split_version"], "settings": settings(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def predictor_for(model: SegmentationModel, cfg: EvaluateParams) -> Predictor:
    return Predictor(model, flip_tta=cfg.flip_tta, tile_above_pixels=cfg.tile_above_pixels,
                     tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap, scales=cfg.scales)


def evaluate_split(model: SegmentationModel, data: Path, cfg: EvaluateParams) -> Evaluation:
    """Predict every image of ``cfg.split`` and count; nothing is written."""
    classes = read_json(Path(data) / paths.CLASSES_FILE)
    n_classes, ignore = classes["num_classes"], classes["ignore_index"]
    if list(model.meta.class_names) != classes["names"]:
        raise EvaluateError(f"the model's classes {list(model.meta.class_names)} are not those of "
                            f"{data / paths.CLASSES_FILE}: {classes['names']}")
    total = len(_ids(data, cfg.split))
    predictor = predictor_for(model, cfg)
    result = Evaluation(classes["names"], classes["palette"], ignore,
                        np.zeros((n_classes, n_classes), np.int64), [])
    boundary = BoundaryIoU(n_classes, ignore, cfg.boundary_width)
    start = time.perf_counter()
    samples = shards.iter_samples(data, cfg.split)
    for image_id, image, truth in tqdm(samples, total=total, desc=f"evaluate {cfg.split}", disable=None):
        pred = predictor.mask(image)
        truth = np.array(truth)            # writable, as torch wants
        cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), n_classes, ignore).numpy()
        result.confusion += cm
        boundary.update(pred, truth)
        result.ids.append(image_id)
        result.image_confusions.append(cm)
        result.predictions.append(overlays.palette_png(pred, classes["palette"]))
    result.seconds = time.perf_counter() - start
    result.boundary_iou = boundary.compute()
    if not result.ids:
        raise EvaluateError(f"{data}/{cfg.split}: the split has no images")
    return result


def _ids(data: Path, split: str) -> list[str]:
    return shards.read_split(data, split, columns=["id"]).column("id").to_pylist()


def _json_number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def report(ev: Evaluation) -> dict[str, Any]:
    """The metrics JSON: headline scores and one entry per class (NaN -> null)."""
    m = segmentation_metrics(torch.from_numpy(ev.confusion))
    truth = ev.confusion.sum(axis=1)
    share = truth / max(1, truth.sum())
    per_class = {
        name: {key: _json_number(value) for key, value in (
            ("iou", m["iou"][c]), ("dice", m["dice"][c]), ("precision", m["precision"][c]),
            ("recall", m["recall"][c]), ("boundary_iou", ev.boundary_iou[c]), ("pixel_share", share[c]))}
        for c, name in enumerate(ev.class_names)
    }
    return {
        "pixel_accuracy": _json_number(m["pixel_accuracy"]), "miou": _json_number(m["miou"]),
        "mean_dice": _json_number(m["mean_dice"]), "fw_iou": _json_number(m["fw_iou"]),
        "boundary_miou": _json_number(float(np.nanmean(ev.boundary_iou))) if any(
            not math.isnan(b) for b in ev.boundary_iou) else None,
        "per_class": per_class, "images": len(ev.ids),
        "images_per_s": round(len(ev.ids) / ev.seconds, 3) if ev.seconds else None,
    }


def full_report(ev: Evaluation, data: Path, cfg: EvaluateParams, run_id: str | None = None,
                data_version: str | None = None) -> dict[str, Any]:
    """Everything one evaluation found, as one JSON-able dict: what was scored (split, its
    data version, the run and its training data version), how (``settings``), under which
    key (``eval_key``), and the scores of ``report``. What ``log_record`` records."""
    header = {"split": cfg.split, "split_version": split_version(data, cfg.split)}
    header["eval_key"] = eval_key(header, cfg)
    header |= {"settings": settings(cfg), "mlflow_run_id": run_id, "data_version": data_version}
    return header | report(ev)


def headline(full: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics file: the key and the headline scores of a ``full_report``, no tables.
    Short, because ``dvc metrics show`` puts the columns of every metrics file in one table,
    which must fit a 200-column terminal (the image count and rate stay in the report)."""
    return {k: full[k] for k in ("eval_key", *records.HEADLINE)}


def image_scores(cm: np.ndarray) -> dict[str, Any]:
    """Pixel accuracy, mIoU and per-class IoU (NaN for classes in neither mask) of one image."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
        acc = tp.sum() / cm.sum()
    return {"pixel_accuracy": float(acc), "miou": float(np.nanmean(iou)) if (union > 0).any() else math.nan,
            "iou": iou}


def select(ev: Evaluation, samples: int, worst_per_class: int) -> tuple[list[str], dict[str, list[str]]]:
    """The first ``samples`` ids, and for each class the ``worst_per_class`` images that
    contain it with the lowest IoU for it (ties broken by id)."""
    first = sorted(ev.ids)[:samples]
    worst: dict[str, list[str]] = {}
    for c, name in enumerate(ev.class_names):
        scored = [(image_scores(cm)["iou"][c], image_id)
                  for image_id, cm in zip(ev.ids, ev.image_confusions, strict=True) if cm[c].sum() > 0]
        worst[name] = [image_id for _, image_id in sorted(scored)[:worst_per_class]]
    return first, worst


def file_stem(image_id: str) -> str:
    """A file name for an image id (ids may hold path separators)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)


def write_outputs(ev: Evaluation, data: Path, cfg: EvaluateParams, out: Path, full: dict[str, Any]) -> None:
    """The overlay folder with the whole report, written beside ``out`` and renamed into place."""
    out = Path(out)
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    for folder, _ in VIEWS.values():
        (staging / folder).mkdir(parents=True)
    first, worst = select(ev, cfg.overlays.samples, cfg.overlays.worst_per_class)
    chosen = set(first) | {i for ids in worst.values() for i in ids}
    rel = {view: {i: f"{folder}/{file_stem(i)}{ext}" for i in ev.ids}
           for view, (folder, ext) in VIEWS.items()}
    entries = []
    for image_id, cm, png in zip(ev.ids, ev.image_confusions, ev.predictions, strict=True):
        (staging / rel["prediction"][image_id]).write_bytes(png)
        scores = image_scores(cm)
        views = ("image", "truth", "prediction", "error", "panel") if image_id in chosen else ("prediction",)
        entries.append({
            "id": image_id, "pixel_accuracy": _json_number(scores["pixel_accuracy"]),
            "miou": _json_number(scores["miou"]),
            "iou": {name: _json_number(v) for name, v in zip(ev.class_names, scores["iou"], strict=True)},
            "files": {view: rel[view][image_id] for view in views},
        })
    for image_id, image, truth in shards.iter_samples(data, cfg.split):
        if image_id in chosen:
            pred = shards.decode_mask(ev.predictions[ev.ids.index(image_id)])
            _write_views(staging, rel, image_id, image, truth, pred, ev)
    write_json_atomic(staging / COUNTS_FILE, {"classes": ev.class_names, "rows": "truth",
                                              "columns": "prediction", "counts": ev.confusion.tolist()})
    header = {k: full[k] for k in ("split", "split_version", "eval_key", "settings", "mlflow_run_id",
                                   "data_version")}
    write_json_atomic(staging / REPORT_FILE, full)
    write_json_atomic(staging / INDEX_FILE, header | {
        "classes": [{"index": c, "name": n, "color": list(rgb)}
                    for c, (n, rgb) in enumerate(zip(ev.class_names, ev.palette, strict=True))],
        "ignore_index": ev.ignore_index, "ignore_color": list(overlays.IGNORE_RGB),
        "error_colors": {"correct": list(overlays.CORRECT_RGB), "wrong": list(overlays.WRONG_RGB),
                         "ignored": list(overlays.IGNORED_RGB)},
        "samples": first, "worst": worst, "images": entries,
    })
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def _write_views(staging: Path, rel: dict, image_id: str, image: np.ndarray, truth: np.ndarray,
                 pred: np.ndarray, ev: Evaluation) -> None:
    (staging / rel["image"][image_id]).write_bytes(overlays.jpeg(image))
    (staging / rel["truth"][image_id]).write_bytes(overlays.palette_png(truth, ev.palette))
    error = overlays.error_map(truth, pred, ev.ignore_index)
    (staging / rel["error"][image_id]).write_bytes(overlays.png(error))
    picture = overlays.panel(image, truth, pred, ev.class_names, ev.palette, ev.ignore_index, title=image_id)
    (staging / rel["panel"][image_id]).write_bytes(overlays.jpeg(picture))


def plot_rows(ev: Evaluation, metrics: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """DVC plots data: one row of scores per class, and the row-normalised confusion matrix
    as long rows."""
    bars = [{"class": name} | metrics["per_class"][name] for name in ev.class_names]
    rows = []
    for t, truth_name in enumerate(ev.class_names):
        total = ev.confusion[t].sum()
        for p, pred_name in enumerate(ev.class_names):
            rows.append({"truth": truth_name, "predicted": pred_name, "pixels": int(ev.confusion[t, p]),
                         "fraction": round(float(ev.confusion[t, p] / total), 6) if total else None})
    return bars, rows


def evaluate(model_dir: Path, data: Path, out: Path, metrics_path: Path, plots_dir: Path,
             params: Path = paths.PARAMS_FILE, track: bool = True) -> dict[str, Any]:
    """Score the model of ``model_dir`` on ``data``, write the outputs, record it on the
    model's MLflow run (``track``); returns the ``full_report``."""
    cfg = load_params(EvaluateParams, params)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = read_config(model_dir)
    model = load_model(model_dir)
    ev = evaluate_split(model, data, cfg)
    full = full_report(ev, data, cfg, config.get("mlflow_run_id"), config.get("data_version"))
    write_outputs(ev, data, cfg, out, full)
    bars, rows = plot_rows(ev, full)
    write_json_atomic(Path(plots_dir) / PER_CLASS_PLOT, bars)
    write_json_atomic(Path(plots_dir) / CONFUSION_PLOT, rows)
    write_json_atomic(metrics_path, headline(full))
    log.info("%s mIoU %.4f, pixel accuracy %.4f, mean Dice %.4f over %d images (%.1f images/s; key %s)",
             cfg.split, full["miou"], full["pixel_accuracy"], full["mean_dice"], len(ev.ids),
             full["images_per_s"] or 0, full["eval_key"])
    if track:
        if full["mlflow_run_id"]:
            log_record(full["mlflow_run_id"], full, overlays_dir=Path(out),
                       plot_files=[Path(plots_dir) / PER_CLASS_PLOT, Path(plots_dir) / CONFUSION_PLOT])
        else:
            log.warning("the model has no MLflow run (trained with tracking off): not recorded in MLflow")
    return full


def log_record(run_id: str, report: dict[str, Any], overlays_dir: Path | None = None,
               plot_files: Sequence[Path] = ()) -> None:
    """Record one evaluation (a ``full_report``) on MLflow run ``run_id`` under its key:
    metrics ``<split>/<key>/...``, the tag ``evaluation/<key>``, and under
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
                                      for k, v in records.flat_metrics(report).items()])
    client.set_tag(run_id, tag, about)
    client.log_dict(run_id, report, f"{records.artifact_dir(key)}/{REPORT_FILE}")
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
    parser.add_argument("--plots", type=Path, default=paths.PLOTS_DIR)
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
