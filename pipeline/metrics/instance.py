"""Instance segmentation scores: COCO mask and box AP (pycocotools' COCOeval) and the
DSB 2018 score, over instances given as COCO RLE masks.

An image's instances are ``Instances``: per instance a class index, a box (x0, y0, x1, y1
in pixels), a COCO RLE mask (``pycocotools.mask.encode``) and, for predictions, a score;
ground truth marks crowd regions (``iscrowd``), which COCOeval ignores rather than counts
as missed.

- ``coco_ap``: COCOeval over a split (one ``Instances`` of truth and one of predictions
  per image): AP over IoU 0.50:0.05:0.95, AP50, AP75, AP of small / medium / large objects,
  and AP per class. pycocotools' summary reads its precision array at ``maxDets=100``
  whatever ``params.maxDets`` says; an image of nuclei holds hundreds of objects, so the
  figures here are read from the array at ``max_detections`` itself.
- ``dsb_score``: the Data Science Bowl 2018 metric: per image, the mean over IoU thresholds
  0.50:0.05:0.95 of TP / (TP + FP + FN), predictions matched one-to-one to truth (highest
  IoU first), then the mean over images. Classes play no part; scores only choose the
  predictions that count (``DEFAULT_MIN_SCORE``, the served answers' default).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
AREA_RANGES = ("all", "small", "medium", "large")
SMALL, LARGE = 32 ** 2, 96 ** 2     # COCO's area bounds (pixels) of small and large objects
MAX_DETECTIONS = 300      # per image: DSB images hold up to a few hundred nuclei
RECALL_POINTS = np.linspace(0.0, 1.0, 101)     # COCOeval's recall thresholds
DEFAULT_MIN_SCORE = 0.5   # the confidence of an answer: served instances and the DSB score's predictions


@dataclass
class Instances:
    """The instances of one image (truth or prediction)."""

    height: int
    width: int
    classes: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)       # x0, y0, x1, y1
    masks: list[dict[str, Any]] = field(default_factory=list)    # COCO RLE, counts as str or bytes
    scores: list[float] = field(default_factory=list)            # predictions only
    iscrowd: list[int] = field(default_factory=list)             # truth only; empty: none

    def __len__(self) -> int:
        return len(self.classes)

    def above(self, min_score: float) -> Instances:
        """The instances scoring at least ``min_score`` (all of them for truth, which has no scores)."""
        if not self.scores or min_score <= 0:
            return self
        keep = [k for k, score in enumerate(self.scores) if score >= min_score]
        return Instances(self.height, self.width, classes=[self.classes[k] for k in keep],
                         boxes=[self.boxes[k] for k in keep], masks=[self.masks[k] for k in keep],
                         scores=[self.scores[k] for k in keep],
                         iscrowd=[self.iscrowd[k] for k in keep] if self.iscrowd else [])


def encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) boolean masks -> N COCO RLEs (counts as str: JSON-ready)."""
    from pycocotools import mask as rle

    masks = np.asarray(masks, dtype=np.uint8)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), not {masks.shape}")
    encoded = rle.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in encoded]


def _rle(mask: dict[str, Any]) -> dict[str, Any]:
    counts = mask["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": list(mask["size"]), "counts": counts}


def mask_iou(truth: Sequence[dict], predicted: Sequence[dict]) -> np.ndarray:
    """(P, T) IoU of every predicted mask with every true one (RLEs of one image)."""
    from pycocotools import mask as rle

    if not truth or not predicted:
        return np.zeros((len(predicted), len(truth)))
    return np.asarray(rle.iou([_rle(m) for m in predicted], [_rle(m) for m in truth],
                              [0] * len(truth)), dtype=np.float64)


def _match_count(iou: np.ndarray, threshold: float) -> int:
    """True positives of a one-to-one matching at ``threshold``: pairs taken greedily,
    highest IoU first, each prediction and each truth at most once."""
    pairs = np.argwhere(iou > threshold)
    if not len(pairs):
        return 0
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_p, used_t, tp = set(), set(), 0
    for p, t in pairs[order]:
        if p not in used_p and t not in used_t:
            used_p.add(p)
            used_t.add(t)
            tp += 1
    return tp


def dsb_image_score(truth: Instances, predicted: Instances) -> float:
    """One image's DSB 2018 score; 1.0 for no truth and no prediction."""
    n_true, n_pred = len(truth), len(predicted)
    if n_true == 0 and n_pred == 0:
        return 1.0
    iou = mask_iou(truth.masks, predicted.masks)
    scores = []
    for t in IOU_THRESHOLDS:
        tp = _match_count(iou, t)
        scores.append(tp / (n_true + n_pred - tp))     # TP / (TP + FP + FN)
    return float(np.mean(scores))


def dsb_score(truth: Sequence[Instances], predicted: Sequence[Instances],
              min_score: float = DEFAULT_MIN_SCORE) -> float:
    """The DSB 2018 score of a split: the mean of ``dsb_image_score`` over its images, counting
    the predictions that score at least ``min_score``. Unlike AP, which ranks predictions by
    score, the DSB score counts every prediction it is given as an answer: a model's
    low-confidence guesses would all be false positives. The default is the confidence the
    served model answers with by default (``format=json``'s ``score_threshold``)."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} images of truth, {len(predicted)} of predictions")
    if not truth:
        raise ValueError("no images to score")
    pairs = zip(truth, predicted, strict=True)
    return float(np.mean([dsb_image_score(t, p.above(min_score)) for t, p in pairs]))


def _coco(truth: Sequence[Instances], predicted: Sequence[Instances], class_names: Sequence[str]):
    from pycocotools.coco import COCO

    _quiet_pycocotools()

    images, annotations, detections = [], [], []
    for image_id, (t, p) in enumerate(zip(truth, predicted, strict=True), start=1):
        images.append({"id": image_id, "height": t.height, "width": t.width})
        crowd = t.iscrowd or [0] * len(t)
        for k in range(len(t)):
            x0, y0, x1, y1 = t.boxes[k]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": t.classes[k],
                                "segmentation": _rle(t.masks[k]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": float(_area(t.masks[k])), "iscrowd": int(crowd[k])})
        for k in range(len(p)):
            x0, y0, x1, y1 = p.boxes[k]
            detections.append({"image_id": image_id, "category_id": p.classes[k], "score": float(p.scores[k]),
                               "segmentation": _rle(p.masks[k]), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": c, "name": n} for c, n in enumerate(class_names)]}
    gt.createIndex()
    dt = gt.loadRes(detections) if detections else None
    return gt, dt


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def _quiet_pycocotools() -> None:
    """pycocotools prints progress ("creating index...", "DONE (t=0.02s)") with ``print``;
    its two modules get a ``print`` of their own that says nothing. (Redirecting stdout is
    not enough: Ray Train replaces the built-in ``print`` in its workers with one that also
    logs every line.)"""
    from pycocotools import coco, cocoeval

    coco.print = cocoeval.print = _silent


def _area(mask: dict[str, Any]) -> int:
    from pycocotools import mask as rle

    return int(rle.area(_rle(mask)))


def coco_ap(truth: Sequence[Instances], predicted: Sequence[Instances], class_names: Sequence[str],
            iou_type: str = "segm", max_detections: int = MAX_DETECTIONS) -> dict[str, Any]:
    """COCO AP of ``predicted`` against ``truth`` (one ``Instances`` each per image, in the
    same order): ``ap`` (IoU 0.50:0.95), ``ap50``, ``ap75``, ``ap_small``, ``ap_medium``,
    ``ap_large``, ``per_class`` {name: AP} and ``pr_curve`` (``precision_recall``); ``iou_type``
    "segm" (masks) or "bbox". A figure with nothing to score (no truth of that size or class)
    is None."""
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} images of truth, {len(predicted)} of predictions")
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    gt, dt = _coco(truth, predicted, class_names)
    if dt is None:      # no prediction at all: AP 0 wherever there is truth to find
        return _empty(truth, class_names)
    ev = COCOeval(gt, dt, iouType=iou_type)
    ev.params.maxDets = [1, 10, max_detections]
    ev.evaluate()
    ev.accumulate()
    # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
    precision = ev.eval["precision"][..., -1]

    def mean(p: np.ndarray) -> float | None:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else None

    area = {name: precision[..., k] for k, name in enumerate(AREA_RANGES)}
    at = {float(t): k for k, t in enumerate(np.round(ev.params.iouThrs, 2))}
    class_ids = list(ev.params.catIds)
    return {
        "ap": mean(area["all"]), "ap50": mean(area["all"][at[0.5]]), "ap75": mean(area["all"][at[0.75]]),
        "ap_small": mean(area["small"]), "ap_medium": mean(area["medium"]), "ap_large": mean(area["large"]),
        "per_class": {class_names[c]: mean(area["all"][:, :, k]) for k, c in enumerate(class_ids)},
        "pr_curve": precision_recall(area["all"], ev.params.recThrs, at),
    }


def precision_recall(precision: np.ndarray, recall: np.ndarray, at: dict[float, int]) -> dict[str, list]:
    """COCOeval's interpolated precision at its 101 recall points, averaged over the classes
    with truth (all object sizes, at the detection cap): at IoU 0.50, 0.75 and averaged over
    0.50:0.95. ``precision``: (IoU thresholds, recall points, classes). None where no class
    has truth."""

    def curve(p: np.ndarray) -> list[float | None]:
        # p: (recall points, classes) or (IoU thresholds, recall points, classes)
        valid = np.where(p > -1, p, np.nan)
        if valid.ndim == 3:
            valid = np.nanmean(valid, axis=0) if not np.isnan(valid).all() else valid[0]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(valid, axis=1)
        return [None if np.isnan(v) else round(float(v), 6) for v in means]

    return {"recall": [round(float(r), 2) for r in recall], "0.50": curve(precision[at[0.5]]),
            "0.75": curve(precision[at[0.75]]), "0.50:0.95": curve(precision)}


def _empty(truth: Sequence[Instances], class_names: Sequence[str]) -> dict[str, Any]:
    """``coco_ap`` without a single prediction: 0 wherever there is truth to find, else None."""
    sizes, classes = set(), set()
    for t in truth:
        for k in range(len(t)):
            if not (t.iscrowd and t.iscrowd[k]):
                area = _area(t.masks[k])
                sizes.add("small" if area < SMALL else "medium" if area < LARGE else "large")
                classes.add(t.classes[k])

    def zero(found: bool) -> float | None:
        return 0.0 if found else None

    flat = [zero(bool(classes))] * len(RECALL_POINTS)
    return {"ap": zero(bool(classes)), "ap50": zero(bool(classes)), "ap75": zero(bool(classes)),
            **{f"ap_{size}": zero(size in sizes) for size in AREA_RANGES[1:]},
            "per_class": {name: zero(c in classes) for c, name in enumerate(class_names)},
            "pr_curve": {"recall": [round(float(r), 2) for r in RECALL_POINTS], "0.50": flat, "0.75": flat,
                         "0.50:0.95": flat}}
