"""Whole-image prediction at native resolution, for evaluation and serving.

``Predictor(model, ...)`` turns one (H, W, 3) uint8 RGB image of any size into class
probabilities (C, H, W):

- up to ``tile_above_pixels`` pixels the image goes through the network whole (the
  model pads it to its stride and crops back, ``pipeline.models.SegmentationModel``);
- above that, overlapping ``tile_size`` windows cover it, the last one in each row and
  column flush with the edge, and the probabilities of overlapping windows are averaged,
  so memory is bounded by one tile whatever the image size;
- with ``flip_tta`` each image or tile is also predicted mirrored left-right, in the same
  batch, and the two probability maps are averaged (test-time augmentation);
- with ``scales`` other than ``(1.0,)`` the image is also resized by each factor (bilinear),
  predicted as above, and the probabilities resized back and averaged (multi-scale TTA).

``masks(images)`` predicts a batch of images of any sizes (a serving batch): images of the
same size go through the network together, one forward per size, so each mask is exactly
what the image would get alone (nothing is padded to a neighbour's size).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inference import to_tensor
from pipeline.models import SegmentationModel


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``length``, sharing about
    ``overlap`` of a tile with the next; the last window ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


@dataclass
class Predictor:
    model: SegmentationModel
    flip_tta: bool = False
    tile_above_pixels: int = 1_048_576
    tile_size: tuple[int, int] = (512, 512)
    tile_overlap: float = 0.25
    scales: tuple[float, ...] = (1.0,)

    @torch.no_grad()
    def probs(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (C, H, W) float32 class probabilities on the CPU."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        total = None
        for scale in self.scales:
            if scale == 1.0:
                p = self._probs_at_native(image)
            else:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                p = F.interpolate(self._probs_at_native(resized)[None], size=(h, w), mode="bilinear",
                                  align_corners=False)[0]
            total = p if total is None else total + p
        return total / len(self.scales)

    def _probs_at_native(self, image: np.ndarray) -> torch.Tensor:
        meta = self.model.meta
        x = to_tensor([image], meta.mean, meta.std)
        h, w = image.shape[:2]
        if h * w <= self.tile_above_pixels:
            return self._forward(x)[0]
        th, tw = min(self.tile_size[0], h), min(self.tile_size[1], w)
        total = None
        hits = torch.zeros(1, h, w)
        for y in window_starts(h, th, self.tile_overlap):
            for x0 in window_starts(w, tw, self.tile_overlap):
                p = self._forward(x[..., y:y + th, x0:x0 + tw])[0]
                if total is None:
                    total = torch.zeros(p.shape[0], h, w)
                total[:, y:y + th, x0:x0 + tw] += p
                hits[:, y:y + th, x0:x0 + tw] += 1
        return total / hits

    def mask(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 class indices."""
        return self.probs(image).argmax(0).to(torch.uint8).numpy()

    @torch.no_grad()
    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class-index masks of ``images`` (any sizes), one forward per distinct size."""
        out: list[np.ndarray | None] = [None] * len(images)
        same_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            small = image.ndim == 3 and image.shape[0] * image.shape[1] <= self.tile_above_pixels
            if small and self.scales == (1.0,) and image.shape[2] == 3 and image.dtype == np.uint8:
                same_size[image.shape].append(i)
            else:                        # tiles, multi-scale, or a bad array for probs() to refuse
                out[i] = self.mask(image)
        meta = self.model.meta
        for indices in same_size.values():
            x = to_tensor([images[i] for i in indices], meta.mean, meta.std)
            labels = self._forward(x).argmax(1).to(torch.uint8).numpy()
            for i, label in zip(indices, labels, strict=True):
                out[i] = label
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised -> (N, C, h, w) probabilities, flip-averaged if asked."""
        device = next(self.model.parameters()).device
        n = x.shape[0]
        batch = torch.cat([x, x.flip(-1)]) if self.flip_tta else x
        out = self.model(batch.to(device))
        if isinstance(out, tuple):       # smp aux_params: (masks, labels)
            out = out[0]
        p = out.float().softmax(dim=1).cpu()
        return (p[:n] + p[n:].flip(-1)) / 2 if self.flip_tta else p
