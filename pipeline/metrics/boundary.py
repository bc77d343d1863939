"""Boundary IoU (Cheng et al., CVPR 2021), per class, accumulated over a split.

For a binary mask M and a width d, the boundary band B_d(M) is the part of M within d
pixels of its contour: M minus M eroded by a (2d+1) x (2d+1) square. The image edge
counts as contour (the mask is padded with background before eroding). A class's
boundary IoU over a split is

    sum |B_d(G) ∩ B_d(P)| / sum |B_d(G) ∪ B_d(P)|

with G and P the truth and predicted masks of the class, summed over images. It scores
how well edges are placed, which region IoU hardly sees on large objects. Pixels whose
truth is the ignore label are left out; a class with an empty union everywhere is NaN.
d is ``width`` times the image diagonal, at least 1 pixel (the paper uses 2 %).
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def band_width(height: int, width: int, share: float) -> int:
    return max(1, round(share * math.hypot(height, width)))


def boundary_band(mask: np.ndarray, d: int) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: the pixels of ``mask`` within ``d`` of its contour."""
    m = np.pad(mask.astype(np.uint8), 1)              # the image edge is a contour
    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    inner = cv2.erode(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)[1:-1, 1:-1]
    return mask & ~inner.astype(bool)


class BoundaryIoU:
    """Per-class boundary intersection and union counts over a split."""

    def __init__(self, num_classes: int, ignore_index: int | None, width: float = 0.02):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.width = width
        self.inter = np.zeros(num_classes, np.int64)
        self.union = np.zeros(num_classes, np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: (H, W) integer class indices each."""
        if pred.shape != truth.shape:
            raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in shape")
        valid = truth != self.ignore_index if self.ignore_index is not None else np.ones(truth.shape, bool)
        d = band_width(*truth.shape, self.width)
        for c in np.union1d(np.unique(pred[valid]), np.unique(truth[valid])):
            g = boundary_band(truth == c, d) & valid
            p = boundary_band(pred == c, d) & valid
            self.inter[c] += np.count_nonzero(g & p)
            self.union[c] += np.count_nonzero(g | p)

    def compute(self) -> list[float]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.inter / self.union).tolist()
