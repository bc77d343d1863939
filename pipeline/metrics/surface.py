"""Surface distances per class over a split: the 95th-percentile Hausdorff distance (HD95) and
the average symmetric surface distance (ASD), in pixels, by MONAI.

Each image is scored per class on its labelled pixels (ignored pixels belong to no class in
either map, so the outline of a void region is a surface of both). A distance needs the class
in both the truth and the prediction: an image with the class in only one of them has none and
is counted in ``unmatched`` instead (a missed or invented class, which IoU already charges).
The split's figure of a class is the mean over the images that have one; NaN (``null``) when
none has.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

PERCENTILE = 95.0


class SurfaceDistances:
    def __init__(self, num_classes: int, ignore_index: int, percentile: float = PERCENTILE) -> None:
        self.num_classes, self.ignore_index, self.percentile = num_classes, ignore_index, percentile
        self.sums = {"hd95": np.zeros(num_classes), "asd": np.zeros(num_classes)}
        self.counts = np.zeros(num_classes, np.int64)
        self.unmatched = np.zeros(num_classes, np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """One image: (H, W) class indices each, ``truth`` with the ignore label."""
        labelled = truth != self.ignore_index
        in_truth = set(np.unique(truth[labelled]).tolist())
        in_pred = set(np.unique(pred[labelled]).tolist())
        for c in in_truth ^ in_pred:
            self.unmatched[c] += 1
        both = sorted(in_truth & in_pred)
        if not both:
            return
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance  # slow import

        maps = [np.stack([(m == c) & labelled for c in both])[None] for m in (pred, truth)]
        y_pred, y = (torch.from_numpy(m) for m in maps)
        with warnings.catch_warnings():      # MONAI 1.6 warns about its own use of a deprecated argument
            warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
            hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=self.percentile)[0]
            asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True)[0]
        for i, c in enumerate(both):
            if math.isfinite(hd[i]) and math.isfinite(asd[i]):
                self.sums["hd95"][c] += float(hd[i])
                self.sums["asd"][c] += float(asd[i])
                self.counts[c] += 1

    def compute(self) -> dict[str, list[float]]:
        """Per class: ``hd95`` and ``asd`` (mean over the images that have one; NaN for none) and
        ``unmatched`` (images with the class in only one of truth and prediction)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {k: (v / self.counts).tolist() for k, v in self.sums.items()}
        return means | {"unmatched": self.unmatched.tolist()}
