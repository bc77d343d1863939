"""Semantic segmentation's evaluation: one confusion matrix over the split, per-image and
per-class scores, boundary IoU, and the pictures of the evaluate stage's folder.

One confusion matrix summed over the split gives the scores (``pipeline.metrics.confusion``):
the ignore label is left out, and a class absent from both truth and prediction is NaN
(``null`` in the JSON files) and left out of the means. Per class also: boundary IoU, and the
surface distances HD95 and ASD in pixels (``pipeline.metrics.surface``: means over the images
with the class in both truth and prediction), whose class means are ``mean_hd95`` and
``mean_asd`` (lower is better).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import records
from pipeline.config import paths
from pipeline.config.params import EvaluateParams
from pipeline.data import shards
from pipeline.inference.predictor import Predictor
from pipeline.inference.refine import RefineError
from pipeline.metrics.boundary import BoundaryIoU
from pipeline.metrics.confusion import confusion_matrix, segmentation_metrics
from pipeline.metrics.surface import SurfaceDistances
from pipeline.models.base import SegmentationModel
from pipeline.tasks.base import EvaluateError
from pipeline.utils.io import read_json, write_json_atomic
from pipeline.viz import overlays

INDEX_FILE = "index.json"
COUNTS_FILE = "confusion.json"
PER_CLASS_PLOT = "per_class.json"
CONFUSION_PLOT = "confusion.json"
VIEWS = {"image": ("images", ".jpg"), "truth": ("truth", ".png"), "prediction": ("predictions", ".png"),
         "error": ("errors", ".png"), "panel": ("panels", ".jpg")}


@dataclass
class Evaluation:
    """What one pass over a split found."""

    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    confusion: np.ndarray                     # (C, C) int64, rows = truth
    boundary_iou: list[float]
    surface: dict[str, list[float]] = field(default_factory=dict)   # SurfaceDistances.compute()
    ids: list[str] = field(default_factory=list)
    image_confusions: list[np.ndarray] = field(default_factory=list)
    predictions: list[bytes] = field(default_factory=list)    # palette PNG per image
    seconds: float = 0.0


def evaluate_split(model: SegmentationModel, data: Path, cfg: EvaluateParams,
                   predictor: Predictor) -> Evaluation:
    """Predict every image of ``cfg.split`` and count; nothing is written."""
    classes = read_json(Path(data) / paths.CLASSES_FILE)
    n_classes, ignore = classes["num_classes"], classes["ignore_index"]
    if list(model.meta.class_names) != classes["names"]:
        raise EvaluateError(f"the model's classes {list(model.meta.class_names)} are not those of "
                            f"{data / paths.CLASSES_FILE}: {classes['names']}")
    total = len(_ids(data, cfg.split))
    result = Evaluation(classes["names"], classes["palette"], ignore,
                        np.zeros((n_classes, n_classes), np.int64), [])
    boundary = BoundaryIoU(n_classes, ignore, cfg.boundary_width)
    surface = SurfaceDistances(n_classes, ignore)
    start = time.perf_counter()
    samples = shards.iter_samples(data, cfg.split)
    for image_id, image, truth in tqdm(samples, total=total, desc=f"evaluate {cfg.split}", disable=None):
        try:
            pred = predictor.mask(image)
        except RefineError as exc:
            raise EvaluateError(f"{cfg.split} image {image_id}: {exc}") from None
        truth = np.array(truth)            # writable, as torch wants
        cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), n_classes, ignore).numpy()
        result.confusion += cm
        boundary.update(pred, truth)
        surface.update(pred, truth)
        result.ids.append(image_id)
        result.image_confusions.append(cm)
        result.predictions.append(overlays.palette_png(pred, classes["palette"]))
    result.seconds = time.perf_counter() - start
    result.boundary_iou = boundary.compute()
    result.surface = surface.compute()
    if not result.ids:
        raise EvaluateError(f"{data}/{cfg.split}: the split has no images")
    return result


def _ids(data: Path, split: str) -> list[str]:
    return shards.read_split(data, split, columns=["id"]).column("id").to_pylist()


def _json_number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def report(ev: Evaluation) -> dict[str, Any]:
    """The metrics JSON: headline scores and one entry per class (NaN -> null)."""
    m = segmentation_metrics(torch.from_numpy(ev.confusion))
    truth = ev.confusion.sum(axis=1)
    share = truth / max(1, truth.sum())
    per_class = {
        name: {key: _json_number(value) for key, value in (
            ("iou", m["iou"][c]), ("dice", m["dice"][c]), ("precision", m["precision"][c]),
            ("recall", m["recall"][c]), ("boundary_iou", ev.boundary_iou[c]), ("pixel_share", share[c]),
            *((key, ev.surface[key][c]) for key in ("hd95", "asd", "unmatched") if key in ev.surface))}
        for c, name in enumerate(ev.class_names)
    }
    distances = {f"mean_{key}": _nanmean(ev.surface[key]) for key in ("hd95", "asd") if key in ev.surface}
    return distances | {
        "pixel_accuracy": _json_number(m["pixel_accuracy"]), "miou": _json_number(m["miou"]),
        "mean_dice": _json_number(m["mean_dice"]), "fw_iou": _json_number(m["fw_iou"]),
        "boundary_miou": _json_number(float(np.nanmean(ev.boundary_iou))) if any(
            not math.isnan(b) for b in ev.boundary_iou) else None,
        "per_class": per_class, "images": len(ev.ids),
        "images_per_s": round(len(ev.ids) / ev.seconds, 3) if ev.seconds else None,
    }


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
    write_json_atomic(staging / records.REPORT_FILE, full)
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


