"""Panoptic scores: PQ, SQ and RQ (Kirillov et al., "Panoptic Segmentation", 2019) with
torchmetrics' ``PanopticQuality``, made to score as COCO's reference (panopticapi's
``pq_compute``) does, and the mIoU of the panoptic output's semantic view.

PQ, per class: predicted and true segments of the class are matched when their IoU is
above 0.5 (a match is then unique: segments do not overlap); SQ = the mean IoU of the
matches (TP), RQ = TP / (TP + FP/2 + FN/2), PQ = SQ x RQ. The overall, things and stuff
figures are unweighted means over the classes with a segment in truth or prediction
(TP + FP + FN > 0); a class absent from both is left out of the means and scores None.
Counts are summed over every image of a split (and over ranks) and the scores computed
once from the sums: segments are matched within one image, never across images.

Void and crowd, as COCO scores them:

- truth void (id 0, or an id no segment names): its pixels are left out of a matched
  pair's union, and an unmatched prediction lying more than half on void is not a false
  positive (FP);
- a crowd truth segment (``iscrowd``) is never matched and never a false negative (FN);
  an unmatched prediction lying more than half on void plus the crowd regions *of its own
  class* is not an FP; in a matched pair's union crowd pixels count like any others;
- predicted void is no segment: a true segment left unpredicted is an FN, and its
  unpredicted pixels count in the union of a match.

What torchmetrics 1.9 does, and what this module does about it. torchmetrics takes
(category, instance) per pixel; any category outside its ``things`` and ``stuffs`` is its
void, on either side. It handles truth void as COCO does, but (1) it treats void in the
*prediction* symmetrically: it subtracts a truth segment's unpredicted pixels from the
union and does not count a truth segment lying more than half on predicted void as an FN;
(2) it has no crowd. So:

- predicted void becomes a category of its own (``UNPREDICTED``, a stuff class that no truth
  holds), so that torchmetrics sees no void in predictions; its FPs are not reported;
- each crowd truth segment becomes a segment of another extra category (``CROWD``): never
  matched to a real class, its FNs not reported, its pixels part of unions as in COCO;
- the one rule torchmetrics cannot express, a crowd region excusing an unmatched prediction
  of its class, is applied after its update (``_excused_by_crowd``): a prediction torchmetrics
  counted as an FP (not more than half on void) that lies more than half on void plus
  its class's crowd regions, and that matches no true segment, is taken back off the FP
  count. COCO's files hold at most one crowd segment per class and image (panopticapi
  keeps only the last one of a class); all of a class's crowd segments are used here.

The semantic view: ``Panoptic.semantic`` of truth (void and crowd pixels ignored) against
the prediction's classes, with predicted void a column of its own (a wrong answer for the
true class), summed in a ``ConfusionMatrix``; mIoU over the dataset's classes as the
semantic task scores it (``pipeline.metrics.confusion``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.metrics.confusion import IGNORE_INDEX, ConfusionMatrix, collective_device, segmentation_metrics
from pipeline.metrics.panoptic_types import Panoptic

MATCH_IOU = 0.5          # a predicted and a true segment match above this IoU (COCO's rule)
EXCUSED_SHARE = 0.5      # an unmatched prediction more than this share on void (and crowd) is no FP
TRUTH_VOID = -1          # a category outside torchmetrics' things and stuffs: its void
PQ_STATES = ("iou_sum", "true_positives", "false_positives", "false_negatives")
COUNTS = ("images", "truth", "crowd", "predicted")     # summed like the PQ states


class PanopticMetric:
    """PQ / SQ / RQ and the semantic view's mIoU over a split (see the module doc).

    ``update`` per batch, ``all_reduce`` once after the last batch when running distributed
    (it sums the per-class IoU sums and TP / FP / FN, the confusion matrix and the segment
    counts over ranks; no image is gathered), then ``compute``.

    class_names, isthing: per dataset class (0-based), its name and whether it is a thing
    class; ignore_index: the semantic view's value of unlabelled pixels (not a class index).
    """

    def __init__(self, class_names: Sequence[str], isthing: Sequence[bool], ignore_index: int = IGNORE_INDEX):
        from torchmetrics.detection import PanopticQuality

        if len(class_names) != len(isthing):
            raise ValueError(f"{len(class_names)} class names but {len(isthing)} isthing flags")
        if not class_names:
            raise ValueError("no classes to score")
        n = len(class_names)
        if 0 <= ignore_index < n:
            raise ValueError(f"ignore_index={ignore_index} is a class index (0..{n - 1})")
        self.class_names = list(class_names)
        self.isthing = [bool(t) for t in isthing]
        self.ignore_index = ignore_index
        self.unpredicted, self.crowd = n, n + 1      # the two extra categories (module doc)
        things = [c for c in range(n) if self.isthing[c]]
        stuffs = [c for c in range(n) if not self.isthing[c]] + [self.unpredicted, self.crowd]
        # Ranks are summed by ``all_reduce``; torchmetrics must not sync again in compute.
        self.pq = PanopticQuality(things, stuffs, return_sq_and_rq=True, return_per_class=True,
                                  sync_on_compute=False, compute_with_cache=False)
        self.confusion = ConfusionMatrix(n + 1, ignore_index)     # column n: predicted void
        self.counts = torch.zeros(len(COUNTS), dtype=torch.int64)

    def update(self, predicted: Sequence[Panoptic], truth: Sequence[Panoptic]) -> None:
        """Add a batch: one predicted and one true ``Panoptic`` per image, in the same order
        (the engine's ``update(outputs, targets)``)."""
        if len(predicted) != len(truth):
            raise ValueError(f"{len(predicted)} predictions for {len(truth)} true images")
        for p, t in zip(predicted, truth, strict=True):
            self._update_image(p, t)

    def update_image(self, predicted: Panoptic, truth: Panoptic) -> float | None:
        """Add one image and return its own PQ: the mean over the dataset classes it holds (a
        segment in truth or prediction) of PQ from this image's counts alone; None when it
        holds none. The same update as ``update``, its per-class counts read before and after."""
        before = [getattr(self.pq, name).clone() for name in PQ_STATES]
        self._update_image(predicted, truth)
        iou, tp, fp, fn = (getattr(self.pq, name) - b for name, b in zip(PQ_STATES, before, strict=True))
        real = [self.pq.cat_id_to_continuous_id[c] for c in range(len(self.class_names))]
        denominator = (tp + 0.5 * fp + 0.5 * fn).double()[real]
        held = denominator > 0
        if not bool(held.any()):
            return None
        return float((iou.double()[real][held] / denominator[held]).mean())

    def _update_image(self, predicted: Panoptic, truth: Panoptic) -> None:
        if predicted.ids.shape != truth.ids.shape:
            raise ValueError(f"a prediction of {predicted.height}x{predicted.width} for a true image of "
                             f"{truth.height}x{truth.width}")
        self._check_categories(predicted, "prediction")
        self._check_categories(truth, "truth")
        pred_class = predicted.category_map(self.unpredicted)
        true_class = truth.category_map(TRUTH_VOID)
        crowd_ids = [s.id for s in truth.segments if s.iscrowd]
        true_class_pq = true_class
        if crowd_ids:
            true_class_pq = np.where(np.isin(truth.ids, crowd_ids), self.crowd, true_class)
        preds = np.stack([pred_class, predicted.ids], axis=-1)
        target = np.stack([true_class_pq, truth.ids], axis=-1)
        self.pq.update(torch.from_numpy(preds)[None], torch.from_numpy(target)[None])
        for category, excused in _excused_by_crowd(predicted, truth, true_class).items():
            self.pq.false_positives[self.pq.cat_id_to_continuous_id[category]] -= excused
        semantic = torch.from_numpy(truth.semantic(self.ignore_index).astype(np.int64))
        self.confusion.update(torch.from_numpy(pred_class)[None], semantic[None])
        present_truth = set(np.unique(truth.ids).tolist())
        present_pred = set(np.unique(predicted.ids).tolist())
        self.counts += torch.tensor([
            1, sum(s.id in present_truth and not s.iscrowd for s in truth.segments),
            sum(s.id in present_truth and s.iscrowd for s in truth.segments),
            sum(s.id in present_pred for s in predicted.segments)])

    def _check_categories(self, panoptic: Panoptic, side: str) -> None:
        for s in panoptic.segments:
            if not 0 <= s.category < len(self.class_names):
                raise ValueError(f"{side} segment {s.id} has class {s.category}; expected 0.."
                                 f"{len(self.class_names) - 1} ({len(self.class_names)} classes)")

    def all_reduce(self) -> PanopticMetric:
        """Sum the counts over all ranks of the default process group; a no-op without one.
        Call it once, after the last update."""
        if dist.is_available() and dist.is_initialized():
            device = collective_device(dist.get_backend())
            for state in [getattr(self.pq, name) for name in PQ_STATES] + [self.counts]:
                summed = state.to(device)
                dist.all_reduce(summed, op=dist.ReduceOp.SUM)
                state.copy_(summed)
            self.confusion.all_reduce()
        return self

    def compute(self) -> dict[str, Any]:
        """``pq``, ``sq``, ``rq`` over all classes, ``*_things``, ``*_stuff``; ``per_class``
        {name: {pq, sq, rq, tp, fp, fn, iou}}; ``miou`` and ``pixel_accuracy`` of the semantic
        view; ``images`` and ``segments`` {truth, crowd, predicted, tp, fp, fn}. A mean over no
        class (e.g. a split without things) is None, as are the PQ figures of an absent class."""
        counts = dict(zip(COUNTS, self.counts.tolist(), strict=True))
        if not counts["images"]:
            raise ValueError("no validation images were scored")
        with warnings.catch_warnings():
            # A rank that saw no batch holds summed states but was never updated: torchmetrics warns.
            warnings.filterwarnings("ignore", message=".*compute.*called before the .*update",
                                    category=UserWarning)
            quality = self.pq.compute().reshape(-1, 3).double()     # (categories, [pq, sq, rq])
        tp, fp, fn = (getattr(self.pq, name).long() for name in PQ_STATES[1:])
        semantic = segmentation_metrics(self.confusion.mat)
        per_class, scored = {}, {}
        for c, name in enumerate(self.class_names):
            k = self.pq.cat_id_to_continuous_id[c]
            present = int(tp[k] + fp[k] + fn[k]) > 0
            values = [float(v) for v in quality[k]] if present else [None] * 3
            per_class[name] = {**dict(zip(("pq", "sq", "rq"), values, strict=True)),
                               "tp": int(tp[k]), "fp": int(fp[k]), "fn": int(fn[k]),
                               "iou": _none_for_nan(semantic["iou"][c])}
            if present:
                scored[c] = values
        out: dict[str, Any] = {}
        for suffix, keep in (("", lambda c: True), ("_things", lambda c: self.isthing[c]),
                             ("_stuff", lambda c: not self.isthing[c])):
            rows = [v for c, v in scored.items() if keep(c)]
            for j, key in enumerate(("pq", "sq", "rq")):
                out[f"{key}{suffix}"] = float(np.mean([r[j] for r in rows])) if rows else None
        real = [self.pq.cat_id_to_continuous_id[c] for c in range(len(self.class_names))]
        iou = np.array(semantic["iou"][:len(self.class_names)], dtype=np.float64)
        out.update(
            per_class=per_class,
            miou=float(np.nanmean(iou)) if not np.isnan(iou).all() else None,
            pixel_accuracy=_none_for_nan(semantic["pixel_accuracy"]),
            images=counts["images"],
            segments={"truth": counts["truth"], "crowd": counts["crowd"], "predicted": counts["predicted"],
                      "tp": int(tp[real].sum()), "fp": int(fp[real].sum()), "fn": int(fn[real].sum())},
        )
        return out


def _none_for_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _excused_by_crowd(predicted: Panoptic, truth: Panoptic, true_class: np.ndarray) -> Counter[int]:
    """Per class, the predictions torchmetrics counted as FPs that COCO excuses for lying on a
    crowd region of their class (module doc). ``true_class``: (H, W) the truth's classes,
    ``TRUTH_VOID`` on void (crowd pixels keep their class)."""
    crowd_by_class: dict[int, list[int]] = {}
    for s in truth.segments:
        if s.iscrowd:
            crowd_by_class.setdefault(s.category, []).append(s.id)
    excused: Counter[int] = Counter()
    if not crowd_by_class:
        return excused
    crowd_ids = {i for ids in crowd_by_class.values() for i in ids}
    true_area = dict(zip(*(a.tolist() for a in np.unique(truth.ids, return_counts=True)), strict=True))
    true_category = {s.id: s.category for s in truth.segments}
    for s in predicted.segments:
        if s.category not in crowd_by_class:
            continue
        inside = predicted.ids == s.id
        area = int(np.count_nonzero(inside))
        if not area:
            continue
        on_void = int(np.count_nonzero(true_class[inside] == TRUTH_VOID))
        on_crowd = int(np.count_nonzero(np.isin(truth.ids[inside], crowd_by_class[s.category])))
        if on_void / area > EXCUSED_SHARE or (on_void + on_crowd) / area <= EXCUSED_SHARE:
            continue           # torchmetrics excused it already, or COCO does not either
        under, common = np.unique(truth.ids[inside], return_counts=True)
        matched = any(
            true_category.get(t) == s.category and t not in crowd_ids
            and x / (area + true_area[t] - x - on_void) > MATCH_IOU
            for t, x in zip(under.tolist(), common.tolist(), strict=True))
        if not matched:
            excused[s.category] += 1
    return excused
