"""Instance segmentation's evaluation: every test image's predicted instances against its
truth, scored over the split with COCOeval (mask and box AP, ``pipeline.metrics.instance``)
and the DSB 2018 score, plus the evaluate stage's folder:

- ``evaluate.json``: the whole report; ``index.json``: per image its DSB score, AP50, the
  counts of true and predicted instances and its picture files, the samples and the worst
  images (lowest DSB score);
- ``truth.json`` and ``predictions.json``: the split in COCO's own formats (ground truth
  with RLE masks; results with score, box and RLE), so that anyone can recompute the AP
  with pycocotools from the files alone;
- ``overlays/``: truth and prediction side by side, each instance in its own colour with
  its class and score, for the chosen images.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import records
from pipeline.config import paths
from pipeline.config.params import EvaluateParams
from pipeline.data import shards
from pipeline.inference.refine import RefineError
from pipeline.metrics.instance import DEFAULT_MIN_SCORE, Instances, coco_ap, dsb_image_score
from pipeline.tasks.base import EvaluateError
from pipeline.tasks.semantic_eval import file_stem
from pipeline.utils.io import read_json, write_json_atomic
from pipeline.viz import instances as draw
from pipeline.viz import overlays

INDEX_FILE = "index.json"
TRUTH_FILE = "truth.json"
PREDICTIONS_FILE = "predictions.json"
PANELS = "overlays"
AP_PLOT = "per_class_ap.json"
PR_PLOT = "precision_recall.json"
PR_COLUMNS = {"0.50": "precision_iou50", "0.75": "precision_iou75", "0.50:0.95": "precision_iou50_95"}


@dataclass
class Evaluation:
    class_names: list[str]
    palette: list[list[int]]
    ids: list[str] = field(default_factory=list)
    truth: list[Instances] = field(default_factory=list)
    predicted: list[Instances] = field(default_factory=list)
    seconds: float = 0.0


def evaluate_split(model, data: Path, cfg: EvaluateParams, predictor) -> Evaluation:
    """Predict every image of ``cfg.split`` with ``predictor`` (an ``InstancePredictor``);
    nothing is written."""
    classes = read_json(Path(data) / paths.CLASSES_FILE)
    if list(model.meta.class_names) != classes["names"]:
        raise EvaluateError(f"the model's classes {list(model.meta.class_names)} are not those of "
                            f"{data / paths.CLASSES_FILE}: {classes['names']}")
    result = Evaluation(classes["names"], classes["palette"])
    total = shards.read_split(data, cfg.split, columns=["id"]).num_rows
    start = time.perf_counter()
    for image_id, image, truth in tqdm(shards.iter_instance_samples(data, cfg.split), total=total,
                                       desc=f"evaluate {cfg.split}", disable=None):
        result.ids.append(image_id)
        result.truth.append(truth)
        try:
            result.predicted.append(predictor.instances([image])[0])
        except RefineError as exc:
            raise EvaluateError(f"{cfg.split} image {image_id}: {exc}") from None
    result.seconds = time.perf_counter() - start
    if not result.ids:
        raise EvaluateError(f"{data}/{cfg.split}: the split has no images")
    return result


def report(ev: Evaluation) -> dict[str, Any]:
    """Mask and box AP (with their size and per-class figures), the DSB score, the PR curve."""
    masks = coco_ap(ev.truth, ev.predicted, ev.class_names, "segm")
    boxes = coco_ap(ev.truth, ev.predicted, ev.class_names, "bbox")
    per_image = image_scores(ev)
    return {
        "mask_ap": masks["ap"], "mask_ap50": masks["ap50"], "mask_ap75": masks["ap75"],
        "mask_ap_small": masks["ap_small"], "mask_ap_medium": masks["ap_medium"],
        "mask_ap_large": masks["ap_large"],
        "box_ap": boxes["ap"], "box_ap50": boxes["ap50"], "box_ap75": boxes["ap75"],
        "dsb_score": float(np.mean([s["dsb_score"] for s in per_image])),
        "per_class": {name: {"mask_ap": masks["per_class"][name], "box_ap": boxes["per_class"][name]}
                      for name in ev.class_names},
        "pr_curve": masks["pr_curve"],
        "instances": {"truth": sum(len(t) for t in ev.truth), "predicted": sum(len(p) for p in ev.predicted)},
        "images": len(ev.ids),
        "images_per_s": round(len(ev.ids) / ev.seconds, 3) if ev.seconds else None,
    }


def image_scores(ev: Evaluation) -> list[dict[str, Any]]:
    """Per image: the DSB score (of the predictions scoring at least ``DEFAULT_MIN_SCORE``),
    mask AP50, and the counts of true and predicted instances."""
    out = []
    for t, p in zip(ev.truth, ev.predicted, strict=True):
        ap50 = coco_ap([t], [p], ev.class_names, "segm")["ap50"] if len(t) else None
        out.append({"dsb_score": dsb_image_score(t, p.above(DEFAULT_MIN_SCORE)), "mask_ap50": ap50,
                    "truth": len(t), "predicted": len(p)})
    return out


def select(ev: Evaluation, scores: list[dict], samples: int, worst: int) -> tuple[list[str], list[str]]:
    """The first ``samples`` ids, and the ``worst`` images by DSB score (ties by id)."""
    first = sorted(ev.ids)[:samples]
    ranked = sorted(zip((s["dsb_score"] for s in scores), ev.ids, strict=True))
    return first, [image_id for _, image_id in ranked[:worst]]


def coco_files(ev: Evaluation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The split as COCO ground truth (images, categories, annotations with RLE) and COCO
    results (image_id, category_id, score, bbox x y w h, RLE); ids follow ``ev.ids``'s order
    from 1, and ``file_name`` is the image id."""
    images, annotations, results = [], [], []
    for image_id, (name, t, p) in enumerate(zip(ev.ids, ev.truth, ev.predicted, strict=True), start=1):
        images.append({"id": image_id, "file_name": name, "height": t.height, "width": t.width})
        crowd = t.iscrowd or [0] * len(t)
        for k in range(len(t)):
            x0, y0, x1, y1 = t.boxes[k]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": t.classes[k],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": t.masks[k],
                                "area": _area(t.masks[k]), "iscrowd": int(crowd[k])})
        for k in range(len(p)):
            x0, y0, x1, y1 = p.boxes[k]
            results.append({"image_id": image_id, "category_id": p.classes[k], "score": p.scores[k],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": p.masks[k]})
    categories = [{"id": c, "name": n} for c, n in enumerate(ev.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def _area(mask: dict) -> int:
    from pycocotools import mask as rle

    return int(rle.area({"size": mask["size"], "counts": mask["counts"].encode("ascii")}))


def write_outputs(ev: Evaluation, data: Path, cfg: EvaluateParams, out: Path, full: dict[str, Any]) -> None:
    """The evaluation folder, written beside ``out`` and renamed into place."""
    out = Path(out)
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / PANELS).mkdir(parents=True)
    scores = image_scores(ev)
    first, worst = select(ev, scores, cfg.overlays.samples, cfg.overlays.worst_per_class)
    chosen = set(first) | set(worst)
    entries = []
    for image_id, s in zip(ev.ids, scores, strict=True):
        files = {"panel": f"{PANELS}/{file_stem(image_id)}.jpg"} if image_id in chosen else {}
        entries.append({"id": image_id, **s, "files": files})
    by_id = dict(zip(ev.ids, range(len(ev.ids)), strict=True))
    for image_id, image, _ in shards.iter_instance_samples(data, cfg.split):
        if image_id in chosen:
            k = by_id[image_id]
            picture = panel(image, ev.truth[k], ev.predicted[k], ev.class_names, title=image_id)
            (staging / f"{PANELS}/{file_stem(image_id)}.jpg").write_bytes(overlays.jpeg(picture))
    truth, results = coco_files(ev)
    write_json_atomic(staging / TRUTH_FILE, truth)
    write_json_atomic(staging / PREDICTIONS_FILE, results)
    header = {k: full[k] for k in ("split", "split_version", "eval_key", "settings", "mlflow_run_id",
                                   "data_version")}
    write_json_atomic(staging / records.REPORT_FILE, full)
    write_json_atomic(staging / INDEX_FILE, header | {
        "classes": [{"index": c, "name": n, "color": list(rgb)}
                    for c, (n, rgb) in enumerate(zip(ev.class_names, ev.palette, strict=True))],
        "samples": first, "worst": worst, "images": entries,
    })
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def panel(image: np.ndarray, truth: Instances, predicted: Instances, names: list[str],
          title: str = "") -> np.ndarray:
    """Image | truth | prediction (each instance in its own colour, labelled), as one RGB picture."""
    views = [overlays.titled(image, title or "image"),
             overlays.titled(draw.overlay(image, truth, names), f"truth: {len(truth)}"),
             overlays.titled(draw.overlay(image, predicted, names), f"prediction: {len(predicted)}")]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([views[0], gap, views[1], gap, views[2]])


def plots(ev: Evaluation, full: dict[str, Any]) -> dict[str, list[dict]]:
    """DVC plots data: per-class mask and box AP; the precision-recall curves, one row per
    recall point with the precision at mask IoU 0.50, 0.75 and averaged over 0.50:0.95."""
    bars = [{"class": name} | full["per_class"][name] for name in ev.class_names]
    curve = full["pr_curve"]
    rows = [{"recall": r, **{column: curve[iou][k] for iou, column in PR_COLUMNS.items()}}
            for k, r in enumerate(curve["recall"])]
    return {AP_PLOT: bars, PR_PLOT: rows}
