"""Panoptic segmentation's evaluation: every test image's fused prediction against its truth,
scored over the split with PQ, SQ and RQ (all classes, things, stuff, per class) and the
semantic view's mIoU (``pipeline.metrics.panoptic``), plus the evaluate stage's folder:

- ``evaluate.json``: the whole report; ``index.json``: per image its PQ, its true and
  predicted segment counts and its picture files, the samples and the worst images
  (lowest PQ);
- ``truth.json`` + ``truth/`` and ``predictions.json`` + ``predictions/``: the split in
  COCO's panoptic format (per image a PNG of segment ids, R + 256 G + 256^2 B, and its
  ``segments_info``: id, category_id, iscrowd, area, bbox x y w h; categories with
  ``isthing``; category ids are the 0-based class indices), so that anyone can recompute
  PQ with a COCO panoptic reader from the files alone;
- ``overlays/``: image | truth | prediction, stuff in class colours and each thing in its
  own shade, outlined, for the chosen images.

Memory: predictions are kept as their encoded PNG and segments, the scores as the
metric's per-class sums: nothing image-sized per image.
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
from pipeline.metrics.panoptic import PanopticMetric
from pipeline.metrics.panoptic_types import Panoptic, Segment, decode_png, encode_png
from pipeline.tasks.base import EvaluateError
from pipeline.tasks.semantic_eval import file_stem
from pipeline.utils.io import read_json, write_json_atomic
from pipeline.viz import overlays
from pipeline.viz import panoptic as draw

INDEX_FILE = "index.json"
TRUTH_FILE, TRUTH_PNGS = "truth.json", "truth"
PREDICTIONS_FILE, PREDICTION_PNGS = "predictions.json", "predictions"
PANELS = "overlays"
PQ_PLOT = "per_class_pq.json"


@dataclass
class Evaluation:
    class_names: list[str]
    palette: list[list[int]]
    isthing: list[bool]
    metric: PanopticMetric
    ids: list[str] = field(default_factory=list)
    predicted: list[tuple[bytes, list[Segment]]] = field(default_factory=list)   # PNG, segments
    per_image: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def prediction(self, k: int) -> Panoptic:
        png, segments = self.predicted[k]
        return Panoptic(ids=decode_png(png), segments=segments)


def evaluate_split(model, data: Path, cfg: EvaluateParams, predictor) -> Evaluation:
    """Predict every image of ``cfg.split`` with ``predictor`` (a ``PanopticPredictor``) and
    score it; nothing is written."""
    classes = read_json(Path(data) / paths.CLASSES_FILE)
    if list(model.meta.class_names) != classes["names"]:
        raise EvaluateError(f"the model's classes {list(model.meta.class_names)} are not those of "
                            f"{data / paths.CLASSES_FILE}: {classes['names']}")
    isthing = [bool(t) for t in classes.get("isthing", [])]
    if [c for c, t in enumerate(isthing) if t] != sorted(model.meta.thing_classes):
        raise EvaluateError(f"the model's thing classes {list(model.meta.thing_classes)} are not those of "
                            f"{data / paths.CLASSES_FILE} (isthing)")
    ignore = classes["ignore_index"]
    result = Evaluation(classes["names"], classes["palette"], isthing,
                        PanopticMetric(classes["names"], isthing, ignore))
    total = shards.read_split(data, cfg.split, columns=["id"]).num_rows
    start = time.perf_counter()
    for image_id, image, truth in tqdm(shards.iter_panoptic_samples(data, cfg.split), total=total,
                                       desc=f"evaluate {cfg.split}", disable=None):
        predicted = predictor.panoptic([image])[0]
        pq = result.metric.update_image(predicted, truth)
        result.ids.append(image_id)
        result.predicted.append((encode_png(predicted.ids), predicted.segments))
        result.per_image.append({"pq": pq, "truth": _present(truth), "predicted": _present(predicted)})
    result.seconds = time.perf_counter() - start
    if not result.ids:
        raise EvaluateError(f"{data}/{cfg.split}: the split has no images")
    return result


def _present(panoptic: Panoptic) -> int:
    """How many of its segments (crowds aside) hold a pixel."""
    present = set(np.unique(panoptic.ids).tolist())
    return sum(s.id in present and not s.iscrowd for s in panoptic.segments)


def report(ev: Evaluation) -> dict[str, Any]:
    """PQ, SQ, RQ (all, things, stuff), the semantic view's mIoU and pixel accuracy, per class
    PQ / SQ / RQ / IoU, the segment counts."""
    scores = ev.metric.compute()
    per_class = {name: {k: scores["per_class"][name][k] for k in ("pq", "sq", "rq", "iou", "tp", "fp", "fn")}
                 for name in ev.class_names}
    return {
        **{k: scores[k] for k in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things",
                                  "pq_stuff", "sq_stuff", "rq_stuff", "miou", "pixel_accuracy")},
        "per_class": per_class,
        "segments": scores["segments"],
        "images": scores["images"],
        "images_per_s": round(len(ev.ids) / ev.seconds, 3) if ev.seconds else None,
    }


def select(ev: Evaluation, samples: int, worst: int) -> tuple[list[str], list[str]]:
    """The first ``samples`` ids, and the ``worst`` images by PQ (images without any scored
    segment last; ties by id)."""
    first = sorted(ev.ids)[:samples]
    ranked = sorted((2.0 if s["pq"] is None else s["pq"], image_id)
                    for s, image_id in zip(ev.per_image, ev.ids, strict=True))
    return first, [image_id for _, image_id in ranked[:worst]]


def segments_info(panoptic: Panoptic, isthing: list[bool]) -> list[dict[str, Any]]:
    """COCO's ``segments_info`` of a ``Panoptic``: per segment present in its map, id,
    category_id, iscrowd, isthing, area and bbox (x, y, w, h), and score for predictions."""
    present, areas = np.unique(panoptic.ids, return_counts=True)
    area = dict(zip(present.tolist(), areas.tolist(), strict=True))
    out = []
    for s in panoptic.segments:
        if s.id not in area:
            continue
        ys, xs = np.nonzero(panoptic.ids == s.id)
        x0, y0 = int(xs.min()), int(ys.min())
        info = {"id": s.id, "category_id": s.category, "iscrowd": int(s.iscrowd),
                "isthing": int(isthing[s.category]), "area": int(area[s.id]),
                "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]}
        if s.score is not None:
            info["score"] = float(s.score)
        out.append(info)
    return out


def _coco_panoptic(ev: Evaluation, entries: list[tuple[str, Panoptic, str]]) -> dict[str, Any]:
    """A COCO panoptic JSON: ``entries`` are (image id, panoptic, PNG file name)."""
    images, annotations = [], []
    for number, (image_id, panoptic, png) in enumerate(entries, start=1):
        images.append({"id": number, "file_name": image_id, "height": panoptic.height,
                       "width": panoptic.width})
        annotations.append({"image_id": number, "file_name": png,
                            "segments_info": segments_info(panoptic, ev.isthing)})
    categories = [{"id": c, "name": n, "isthing": int(t), "color": list(rgb)}
                  for c, (n, t, rgb) in enumerate(zip(ev.class_names, ev.isthing, ev.palette, strict=True))]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_outputs(ev: Evaluation, data: Path, cfg: EvaluateParams, out: Path, full: dict[str, Any]) -> None:
    """The evaluation folder, written beside ``out`` and renamed into place."""
    out = Path(out)
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    for folder in (PANELS, TRUTH_PNGS, PREDICTION_PNGS):
        (staging / folder).mkdir(parents=True)
    first, worst = select(ev, cfg.overlays.samples, cfg.overlays.worst_per_class)
    chosen = set(first) | set(worst)
    by_id = {image_id: k for k, image_id in enumerate(ev.ids)}
    truths, predictions = [], []
    for image_id, image, truth in shards.iter_panoptic_samples(data, cfg.split):
        k, png = by_id[image_id], f"{file_stem(image_id)}.png"
        predicted = ev.prediction(k)
        (staging / TRUTH_PNGS / png).write_bytes(encode_png(truth.ids))
        (staging / PREDICTION_PNGS / png).write_bytes(ev.predicted[k][0])
        truths.append((image_id, truth, png))
        predictions.append((image_id, predicted, png))
        if image_id in chosen:
            picture = draw.panel(image, truth, predicted, ev.palette, ev.isthing, title=image_id)
            (staging / PANELS / f"{file_stem(image_id)}.jpg").write_bytes(overlays.jpeg(picture))
    write_json_atomic(staging / TRUTH_FILE, _coco_panoptic(ev, truths))
    write_json_atomic(staging / PREDICTIONS_FILE, _coco_panoptic(ev, predictions))
    entries = [{"id": image_id, **s,
                "files": {"panel": f"{PANELS}/{file_stem(image_id)}.jpg"} if image_id in chosen else {}}
               for image_id, s in zip(ev.ids, ev.per_image, strict=True)]
    header = {k: full[k] for k in ("split", "split_version", "eval_key", "settings", "mlflow_run_id",
                                   "data_version")}
    write_json_atomic(staging / records.REPORT_FILE, full)
    write_json_atomic(staging / INDEX_FILE, header | {
        "classes": [{"index": c, "name": n, "color": list(rgb), "isthing": thing} for c, (n, rgb, thing)
                    in enumerate(zip(ev.class_names, ev.palette, ev.isthing, strict=True))],
        "samples": first, "worst": worst, "images": entries,
    })
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def plots(ev: Evaluation, full: dict[str, Any]) -> dict[str, list[dict]]:
    """DVC plots data: per-class PQ, SQ and RQ."""
    return {PQ_PLOT: [{"class": name, **{k: full["per_class"][name][k] for k in ("pq", "sq", "rq")}}
                      for name in ev.class_names]}
