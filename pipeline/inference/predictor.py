"""Whole-image prediction at native resolution, for evaluation and serving.

``Predictor(model, ...)`` turns one (H, W, 3) uint8 RGB image of any size into a class
mask (H, W) uint8 (``mask``) or class probabilities (C, H, W) float32 (``probs``):

- up to ``tile_above_pixels`` pixels the image goes through the network whole (the
  model pads it to its stride and crops back, ``pipeline.models.base.SegmentationModel``);
  with ``scales`` other than ``(1.0,)`` it is also resized by each factor (bilinear),
  predicted as above (in tiles if the resized image is above the threshold), and the
  probabilities resized back and averaged (multi-scale TTA);
- above that, overlapping ``tile_size`` windows cover it, the last one in each row and
  column flush with the edge, and the probabilities of overlapping windows are averaged.
  Windows are visited one band at a time along the image's longer side, and only the
  current band's probabilities are held (C x tile x the shorter side, float32): a band's
  finished rows become mask rows before the next band starts, so ``mask`` holds that,
  one window's forward pass and the uint8 mask whatever the image size (``probs`` must
  return all C x H x W and holds it). Multi-scale TTA then applies to each window (the
  window resized by each factor, its probabilities resized back), so it stays bounded too;
- with ``flip_tta`` each image or window is also predicted mirrored left-right, in the
  same batch, and the two probability maps are averaged (test-time augmentation).
- with ``postprocess`` (a ``Refinement``: ``crf`` or ``grabcut``) the mask is refined with the
  image from the whole image's probabilities (``pipeline.inference.refine.refine_mask``);
  images above ``tile_above_pixels`` are refused then (``RefineError``), since a refinement
  needs C x H x W at once.

``masks(images)`` predicts a batch of images of any sizes (a serving batch): images of the
same size go through the network together, one forward per size, so each mask is exactly
what the image would get alone (nothing is padded to a neighbour's size).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inference.refine import RefineError, check_available, refine_mask
from pipeline.inference.tensors import to_tensor
from pipeline.models.base import NO_REFINEMENT, InferenceSettings, Refinement, SegmentationModel


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``length``, sharing about
    ``overlap`` of a tile with the next; the last window ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


# Finished rows are divided by their window counts this many at a time (a small temporary).
FINISH_ROWS = 64
Where = tuple[slice, slice]          # (rows, columns) of an image


def _check(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")


def _coverage(length: int, tile: int, starts: list[int]) -> torch.Tensor:
    """(length,) float32: how many windows of ``tile`` starting at ``starts`` cover each index."""
    hits = torch.zeros(length)
    for s in starts:
        hits[s:s + tile] += 1
    return hits


def inference_settings(model, overrides: dict[str, Any]) -> dict[str, Any]:
    """The inference settings the model records (``model.meta.inference``; none: {}), each
    replaced by an override that is not None: a predictor's keywords (any task's)."""
    recorded = model.meta.inference
    settings = {} if recorded is None else asdict(recorded)
    return settings | {k: v for k, v in overrides.items() if v is not None}


@dataclass
class RecordedSettings:
    """A predictor's model and ``InferenceSettings``' fields, which ``for_model`` reads from the
    model's meta and ``settings`` gives back; every task's predictor adds its own fields."""

    model: SegmentationModel
    flip_tta: bool = False
    tile_above_pixels: int = 1_048_576
    tile_size: tuple[int, int] = (512, 512)
    tile_overlap: float = 0.25
    scales: tuple[float, ...] = (1.0,)
    postprocess: Refinement | None = None

    def __post_init__(self) -> None:
        refinement = Refinement.of(self.postprocess)     # an explicit "none" overrides the model's own
        self.postprocess = None if refinement is None or refinement.method == NO_REFINEMENT else refinement

    @classmethod
    def for_model(cls, model: SegmentationModel, **overrides):
        """A predictor with the settings the model records (``model.meta.inference``), each
        replaced by an override that is not None. A model that records none (logged by
        training, before any evaluation) starts from this class's defaults: plain prediction."""
        return cls(model, **inference_settings(model, overrides))

    def settings(self) -> InferenceSettings:
        return InferenceSettings(self.flip_tta, self.scales, self.tile_above_pixels, self.tile_size,
                                 self.tile_overlap, self.postprocess)


def refuse_probability_tta(predictor, task: str, refinements: tuple[str, ...] = ()) -> None:
    """Normalise ``scales`` and ``tile_size`` to tuples, and refuse flip and multi-scale TTA and
    refinements (but ``refinements``), which are defined for class probabilities, for a ``task``
    whose predictions are not."""
    predictor.scales = tuple(float(s) for s in predictor.scales)
    predictor.tile_size = tuple(int(t) for t in predictor.tile_size)
    if predictor.flip_tta:
        raise ValueError(f"flip_tta: flip test-time augmentation is not defined for {task} "
                         "segmentation; set flip_tta to false")
    if predictor.scales != (1.0,):
        listed = ", ".join(f"{s:g}" for s in predictor.scales)
        raise ValueError(f"scales: multi-scale prediction ({listed}) is not defined for {task} "
                         "segmentation; set scales to [1.0]")
    if predictor.postprocess is not None and predictor.postprocess.method not in refinements:
        allowed = ", ".join(("none", *refinements))
        raise ValueError(f"postprocess: {predictor.postprocess.method} refines class probabilities, which "
                         f"{task} segmentation does not predict; set postprocess to {allowed}")


@dataclass
class Predictor(RecordedSettings):
    max_pixels: ClassVar[int | None] = None    # the largest image it predicts: any (it tiles)

    def __post_init__(self) -> None:
        super().__post_init__()
        classes = len(self.model.meta.class_names)
        if self.postprocess is not None and self.postprocess.method == "grabcut" and classes != 2:
            raise ValueError(f"postprocess: grabcut refines a binary mask (2 classes); this model has "
                             f"{classes}: use crf")
        if self.postprocess is not None:
            check_available(self.postprocess.method)

    @torch.no_grad()
    def probs(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (C, H, W) float32 class probabilities on the CPU."""
        _check(image)
        return self._tiled_probs(image, self.scales) if self._tiled(image) else self._whole(image)

    @torch.no_grad()
    def mask(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 class indices."""
        _check(image)
        if self.postprocess is not None:
            if self._tiled(image):
                h, w = image.shape[:2]
                raise RefineError(f"postprocess {self.postprocess.method}: refines images of at most "
                                  f"tile_above_pixels ({self.tile_above_pixels:,}) pixels whole; this one "
                                  f"has {h * w:,}")
            return refine_mask(image, self._whole(image).numpy(), self.postprocess)
        if not self._tiled(image):
            return self._whole(image).argmax(0).to(torch.uint8).numpy()
        mask = np.empty(image.shape[:2], np.uint8)
        for where, block in self._bands(image, self.scales):
            mask[where] = block.argmax(0).to(torch.uint8).numpy()
        return mask

    def _tiled(self, image: np.ndarray) -> bool:
        return image.shape[0] * image.shape[1] > self.tile_above_pixels

    def _whole(self, image: np.ndarray) -> torch.Tensor:
        """(C, H, W) probabilities of an image at or below the tiling threshold, averaged over
        ``scales``; a resized image above the threshold is tiled at its own resolution."""
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
        if not self._tiled(image):
            return self._forward(self._normalise(image))[0]
        return self._tiled_probs(image, (1.0,))

    def _tiled_probs(self, image: np.ndarray, scales: tuple[float, ...]) -> torch.Tensor:
        """(C, H, W): the bands of ``_bands`` put together (all of it held, as ``probs`` must)."""
        out = None
        for where, block in self._bands(image, scales):
            out = torch.empty(block.shape[0], *image.shape[:2]) if out is None else out
            out[(slice(None), *where)] = block
        return out

    def _bands(self, image: np.ndarray, scales: tuple[float, ...]) -> Iterator[tuple[Where, torch.Tensor]]:
        """Finished parts of the blended probabilities of a tiled ``image``, in order:
        (where: (rows, columns) slices of the image, block: (C, rows, columns) float32).

        Bands run along the longer side: a wide image is swept in columns, by sweeping its
        transpose in rows (each window is still predicted the right way round)."""
        if image.shape[1] <= image.shape[0]:
            for rows, block in self._row_bands(image, self.tile_size, scales, transposed=False):
                yield (rows, slice(None)), block
        else:
            view = image.transpose(1, 0, 2)
            tile = (self.tile_size[1], self.tile_size[0])
            for cols, block in self._row_bands(view, tile, scales, transposed=True):
                yield (slice(None), cols), block.transpose(1, 2)

    def _row_bands(self, image: np.ndarray, tile: tuple[int, int], scales: tuple[float, ...],
                   transposed: bool) -> Iterator[tuple[slice, torch.Tensor]]:
        """Sweep the rows of windows top to bottom, holding one band (C, tile height, W).

        Each band's windows are added in order into ``band``, which covers image rows
        [top, top + th); the rows above the next band's first row get no more windows, so
        they are divided by their window count and handed out, and the rest moves up. Every
        pixel sums its windows in the same row-major order as a whole-image accumulator."""
        h, w = image.shape[:2]
        th, tw = min(tile[0], h), min(tile[1], w)
        ys, xs = window_starts(h, th, self.tile_overlap), window_starts(w, tw, self.tile_overlap)
        row_hits, col_hits = _coverage(h, th, ys), _coverage(w, tw, xs)
        band = None
        for i, y in enumerate(ys):
            for x0 in xs:
                window = image[y:y + th, x0:x0 + tw]
                p = self._window(window.transpose(1, 0, 2) if transposed else window, scales)
                p = p.transpose(1, 2) if transposed else p
                band = torch.zeros(p.shape[0], th, w) if band is None else band
                band[:, :, x0:x0 + tw] += p
            done = (ys[i + 1] if i + 1 < len(ys) else h) - y          # rows [y, y + done) are final
            for r0 in range(0, done, FINISH_ROWS):                   # in slices: a small temporary
                r1 = min(done, r0 + FINISH_ROWS)
                hits = row_hits[y + r0:y + r1, None] * col_hits[None, :]
                yield slice(y + r0, y + r1), band[:, r0:r1] / hits
            band[:, :th - done] = band[:, done:].clone()
            band[:, th - done:] = 0

    def _window(self, window: np.ndarray, scales: tuple[float, ...]) -> torch.Tensor:
        """(C, h, w) probabilities of one window, averaged over ``scales`` (each resized
        window's probabilities resized back to h x w) and flips."""
        h, w = window.shape[:2]
        total = None
        for scale in scales:
            if scale == 1.0:
                p = self._forward(self._normalise(window))[0]
            else:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                resized = cv2.resize(np.ascontiguousarray(window), size, interpolation=cv2.INTER_LINEAR)
                p = F.interpolate(self._forward(self._normalise(resized)), size=(h, w), mode="bilinear",
                                  align_corners=False)[0]
            total = p if total is None else total + p
        return total if len(scales) == 1 else total / len(scales)

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        return to_tensor([image], self.model.meta.mean, self.model.meta.std)

    @torch.no_grad()
    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class-index masks of ``images`` (any sizes), one forward per distinct size (one each
        with a refinement)."""
        if self.postprocess is not None:
            return [self.mask(image) for image in images]
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
