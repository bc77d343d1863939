"""Instances of whole images at native resolution, for serving and evaluation.

An instance model (``pipeline.models.torchvision``) in eval mode takes x (N, 3, H, W) float32
normalised with ``model.meta.mean`` / ``std`` and returns one dict per image: ``boxes``
(K, 4) float x0, y0, x1, y1 in pixels, ``labels`` (K,) int64 0-based classes, ``scores`` (K,)
and ``masks`` (K, 1, H, W) float probabilities. ``to_instances`` turns one such dict into
``pipeline.metrics.instance.Instances``: masks above ``mask_threshold``, as COCO RLE, in
score order (highest first), empty masks dropped.

``InstancePredictor(model, ...).instances(images)`` predicts a batch of (H, W, 3) uint8 RGB
images of any sizes:

- up to ``tile_above_pixels`` pixels an image goes through the network whole; images of
  the same size go together, one forward per size;
- above that, overlapping ``tile_size`` windows cover it (``window_starts``: the last one in
  each row and column flush with the edge), one forward each. An object cut by a window's
  border is seen, cut, by two (or more) windows; in the band two windows share, each of
  its pieces covers the same pixels. Pieces of one class from two overlapping windows are
  joined when, inside the shared band, their common pixels are at least ``merge_overlap`` of
  the smaller piece's pixels there (chains of such pairs join too): the masks' union, the
  boxes' union, the highest score. Instances from windows that share none then count as
  duplicates when their mask IoU is above ``nms_iou`` (same class), and the lower-scored
  one goes (mask NMS). Instances of one window are left as the model gave them, so an
  object inside a window comes back as the whole image would give it.

  Memory: one window's forward and its output; each piece is kept as the RLE of its
  bounding crop, and a joined instance's mask is put together over its own bounding box,
  never as an image-sized array per instance (``pipeline.inference.rle.from_crop``).

Flip test-time augmentation and multi-scale prediction are defined for class probabilities
(``pipeline.inference.predictor``), not for instances: settings that ask for them are refused,
as is the dense CRF. ``postprocess: grabcut`` refines each instance's mask with the image:
GrabCut seeded from its mask probabilities (``pipeline.inference.refine.grabcut``, within its
``margin``), for images predicted whole (larger ones are refused).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from pipeline.inference.predictor import RecordedSettings, _check, refuse_probability_tta, window_starts
from pipeline.inference.refine import RefineError, check_available, grabcut
from pipeline.inference.rle import from_crop
from pipeline.inference.tensors import forward_images
from pipeline.metrics.instance import Instances, encode, mask_iou

CHUNK = 16          # masks thresholded and encoded this many at a time (a bounded temporary)


def _ordered(output: dict, score_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores on the CPU, indices of those >= score_threshold, highest first; ties keep order)."""
    scores = output["scores"].detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    return scores, order[scores[order] >= score_threshold]


def _masks(output: dict, order: torch.Tensor, height: int, width: int,
           mask_threshold: float, refine: Callable[[np.ndarray], np.ndarray] | None = None):
    """(index, (height, width) uint8 mask) of each instance of ``order`` whose mask is not
    empty, in order, thresholded ``CHUNK`` at a time on the model's device; with ``refine``
    ((height, width) float32 probabilities -> bool mask, e.g. GrabCut) each is refined instead."""
    masks = output["masks"]
    if masks.shape[-2] < height or masks.shape[-1] < width:
        raise ValueError(f"masks of {tuple(masks.shape[-2:])} for an image of {height}x{width}")
    for c in range(0, len(order), CHUNK):
        chunk = order[c:c + CHUNK]
        if refine is not None:
            probabilities = masks[chunk.to(masks.device), 0, :height, :width].float().cpu().numpy()
            binary = np.array([refine(p) for p in probabilities], np.uint8).reshape(-1, height, width)
        else:
            binary = masks[chunk.to(masks.device), 0, :height, :width] > mask_threshold
            binary = binary.to(torch.uint8).cpu().numpy()
        for index, mask in zip(chunk.tolist(), binary, strict=True):
            if mask.any():
                yield index, mask


def _box(output: dict, index: int, height: int, width: int, dy: int = 0, dx: int = 0) -> list[float]:
    """Instance ``index``'s box clipped to the (height, width) input, shifted by (dy, dx)."""
    x0, y0, x1, y1 = output["boxes"][index].detach().float().cpu().tolist()
    x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    return [x0 + dx, y0 + dy, x1 + dx, y1 + dy]


def to_instances(output: dict, height: int, width: int, mask_threshold: float = 0.5,
                 score_threshold: float = 0.0, max_instances: int | None = None,
                 refine: Callable[[np.ndarray], np.ndarray] | None = None) -> Instances:
    """One image's model output -> ``Instances`` (height x width; a larger, padded mask is
    cropped): instances scoring at least ``score_threshold``, highest score first, at most
    ``max_instances``; masks above ``mask_threshold`` (or ``refine``'s of the mask
    probabilities) as COCO RLE, those left empty dropped; boxes the model's, clipped to the image."""
    scores, order = _ordered(output, score_threshold)
    labels = output["labels"].detach().cpu()
    out = Instances(height, width)
    kept, masks = [], []
    for index, mask in _masks(output, order, height, width, mask_threshold, refine):
        kept.append(index)
        masks.append(mask)
        if max_instances is not None and len(kept) >= max_instances:
            break
        if len(masks) == CHUNK:
            out.masks += encode(np.stack(masks))
            masks = []
    if masks:
        out.masks += encode(np.stack(masks))
    out.classes = [int(labels[i]) for i in kept]
    out.scores = [float(scores[i]) for i in kept]
    out.boxes = [_box(output, i, height, width) for i in kept]
    return out


def select(instances: Instances, score_threshold: float = 0.0, max_instances: int | None = None) -> Instances:
    """The instances scoring at least ``score_threshold``, highest first, at most ``max_instances``."""
    order = sorted(range(len(instances)), key=lambda i: -instances.scores[i])
    order = [i for i in order if instances.scores[i] >= score_threshold][:max_instances]
    return Instances(instances.height, instances.width, [instances.classes[i] for i in order],
                     [instances.boxes[i] for i in order], [instances.masks[i] for i in order],
                     [instances.scores[i] for i in order],
                     [instances.iscrowd[i] for i in order] if instances.iscrowd else [])


@dataclass
class Piece:
    """An instance found in one window, in image coordinates: its mask is ``crop`` (the RLE of
    its bounding crop, h x w) placed at (top, left)."""

    window: int
    label: int
    score: float
    box: list[float]
    top: int
    left: int
    crop: dict
    windows: set[int] = field(default_factory=set)

    @property
    def rect(self) -> Rect:
        h, w = self.crop["size"]
        return self.top, self.left, self.top + h, self.left + w

    def mask(self) -> np.ndarray:
        from pycocotools import mask as rle

        size, counts = self.crop["size"], self.crop["counts"].encode("ascii")
        return rle.decode({"size": size, "counts": counts}).astype(bool)


Rect = tuple[int, int, int, int]       # top, left, bottom, right (exclusive)


def _intersect(a: Rect, b: Rect) -> Rect | None:
    """The overlap of two (top, left, bottom, right) rectangles, or None."""
    top, left, bottom, right = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (top, left, bottom, right) if top < bottom and left < right else None


def _within(piece: Piece, mask: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The part of ``piece``'s crop ``mask`` inside ``rect`` (which lies inside the crop)."""
    return mask[rect[0] - piece.top:rect[2] - piece.top, rect[1] - piece.left:rect[3] - piece.left]


def _pieces(output: dict, window: int, top: int, left: int, h: int, w: int, predictor: InstancePredictor):
    """The instances of one (h x w) window at (top, left) as ``Piece``s."""
    scores, order = _ordered(output, predictor.score_threshold)
    labels = output["labels"].detach().cpu()
    for index, mask in _masks(output, order, h, w, predictor.mask_threshold):
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = encode(mask[None, y0:y1, x0:x1])[0]
        yield Piece(window, int(labels[index]), float(scores[index]), _box(output, index, h, w, top, left),
                    top + int(y0), left + int(x0), crop, {window})


class _Groups:
    """Union-find over piece indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


@dataclass
class InstancePredictor(RecordedSettings):
    """Instances of whole images (see the module doc). The first five fields are
    ``InferenceSettings``' (``for_model`` reads them from the model); flip TTA and scales other
    than (1.0,) are refused."""

    mask_threshold: float = 0.5
    score_threshold: float = 0.0
    max_instances: int | None = None
    max_pixels: ClassVar[int | None] = None    # the largest image it predicts: any (it tiles)
    merge_overlap: float = 0.5     # of the smaller piece's pixels in the shared band: join
    nms_iou: float = 0.5           # mask IoU of instances from windows that share none: duplicates

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_probability_tta(self, "instance", refinements=("grabcut",))
        if self.postprocess is not None:
            check_available(self.postprocess.method)
        if not 0.0 < self.tile_overlap < 1.0:
            raise ValueError(f"tile_overlap: {self.tile_overlap:g}; instances cut by a tile border are "
                             "joined in the band two tiles share, so it must be above 0 (and below 1)")

    @torch.inference_mode()
    def instances(self, images: list[np.ndarray]) -> list[Instances]:
        """(H, W, 3) uint8 RGB images of any sizes -> their ``Instances`` (score order)."""
        for image in images:
            _check(image)
        out: list[Instances | None] = [None] * len(images)
        same_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            if self._tiled(image):
                if self.postprocess is not None:
                    raise RefineError(f"postprocess {self.postprocess.method}: refines images of at most "
                                      f"tile_above_pixels ({self.tile_above_pixels:,}) pixels whole; this "
                                      f"one has {image.shape[0] * image.shape[1]:,}")
                out[i] = self._tiled_instances(image)
            else:
                same_size[image.shape].append(i)
        for (h, w, _), indices in same_size.items():
            outputs = self._forward([images[i] for i in indices])
            for i, output in zip(indices, outputs, strict=True):
                out[i] = to_instances(output, h, w, self.mask_threshold, self.score_threshold,
                                      self.max_instances, self._refiner(images[i]))
        return out

    def _refiner(self, image: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
        """GrabCut of one instance's mask probabilities with ``image``, or None (thresholds)."""
        if self.postprocess is None:
            return None
        kwargs = self.postprocess.kwargs()
        return lambda probability: grabcut(image, probability, **kwargs)

    def _tiled(self, image: np.ndarray) -> bool:
        return image.shape[0] * image.shape[1] > self.tile_above_pixels

    def _forward(self, images: list[np.ndarray]) -> list[dict]:
        return forward_images(self.model, images)

    def _tiled_instances(self, image: np.ndarray) -> Instances:
        h, w = image.shape[:2]
        th, tw = min(self.tile_size[0], h), min(self.tile_size[1], w)
        windows = [(y, x, y + th, x + tw) for y in window_starts(h, th, self.tile_overlap)
                   for x in window_starts(w, tw, self.tile_overlap)]
        pieces: list[Piece] = []
        for k, (y, x, _, _) in enumerate(windows):
            output = self._forward([np.ascontiguousarray(image[y:y + th, x:x + tw])])[0]
            pieces += _pieces(output, k, y, x, th, tw, self)
        joined = self._join(windows, pieces)
        kept = self._drop_duplicates(joined, h, w)
        kept.sort(key=lambda p: -p.score)
        kept = kept[:self.max_instances]
        return Instances(h, w, [p.label for p in kept], [p.box for p in kept],
                         [from_crop(p.mask(), p.top, p.left, h, w) for p in kept], [p.score for p in kept])

    def _join(self, windows: list[Rect], pieces: list[Piece]) -> list[Piece]:
        """Pieces of an object cut by window borders joined into one (see the module doc)."""
        groups = _Groups(len(pieces))
        by_window: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(pieces):
            by_window[p.window].append(i)
        for a in range(len(windows)):
            for b in range(a + 1, len(windows)):
                band = _intersect(windows[a], windows[b])
                if band is not None:
                    self._join_band(band, pieces, by_window[a], by_window[b], groups)
        members: dict[int, list[int]] = defaultdict(list)
        for i in range(len(pieces)):
            members[groups.find(i)].append(i)
        return [pieces[m[0]] if len(m) == 1 else _union([pieces[i] for i in m]) for m in members.values()]

    def _join_band(self, band: Rect, pieces: list[Piece], a: list[int], b: list[int],
                   groups: _Groups) -> None:
        """Join pieces ``a`` of one window with pieces ``b`` of another that overlap in ``band``,
        the two windows' common rectangle."""
        inside = [(i, pieces[i], r) for i in a if (r := _intersect(pieces[i].rect, band))]
        others = [(j, pieces[j], r) for j in b if (r := _intersect(pieces[j].rect, band))]
        masks: dict[int, np.ndarray] = {}

        def in_band(k: int, piece: Piece, rect) -> np.ndarray:
            if k not in masks:
                masks[k] = piece.mask()
            return _within(piece, masks[k], rect)

        for i, p, p_rect in inside:
            for j, q, q_rect in others:
                common = _intersect(p_rect, q_rect)
                if p.label != q.label or common is None:
                    continue
                both = np.count_nonzero(in_band(i, p, common) & in_band(j, q, common))
                smaller = min(np.count_nonzero(in_band(i, p, p_rect)),
                              np.count_nonzero(in_band(j, q, q_rect)))
                if smaller and both >= self.merge_overlap * smaller:
                    groups.join(i, j)

    def _drop_duplicates(self, pieces: list[Piece], height: int, width: int) -> list[Piece]:
        """Mask NMS between instances of windows that share none (see the module doc)."""
        order = sorted(range(len(pieces)), key=lambda i: -pieces[i].score)
        dropped: set[int] = set()
        candidates = _overlapping_rects([p.rect for p in pieces])
        rles: dict[int, dict] = {}

        def rle_of(i: int) -> dict:
            if i not in rles:
                p = pieces[i]
                rles[i] = from_crop(p.mask(), p.top, p.left, height, width)
            return rles[i]

        for i in order:
            if i in dropped:
                continue
            for j in candidates[i]:
                p, q = pieces[i], pieces[j]
                if j in dropped or q.score > p.score or (q.score == p.score and j < i):
                    continue
                if p.label == q.label and not (p.windows & q.windows) \
                        and mask_iou([rle_of(i)], [rle_of(j)])[0, 0] > self.nms_iou:
                    dropped.add(j)
        return [p for i, p in enumerate(pieces) if i not in dropped]


def _union(pieces: list[Piece]) -> Piece:
    """One instance of joined pieces: the masks' union, the boxes' union, the best score and its class."""
    top = min(p.top for p in pieces)
    left = min(p.left for p in pieces)
    bottom = max(p.rect[2] for p in pieces)
    right = max(p.rect[3] for p in pieces)
    mask = np.zeros((bottom - top, right - left), bool)
    for p in pieces:
        t, x, b, r = p.rect
        mask[t - top:b - top, x - left:r - left] |= p.mask()
    best = max(pieces, key=lambda p: p.score)
    box = [min(p.box[0] for p in pieces), min(p.box[1] for p in pieces),
           max(p.box[2] for p in pieces), max(p.box[3] for p in pieces)]
    return Piece(best.window, best.label, best.score, box, top, left, encode(mask[None])[0],
                 set().union(*(p.windows for p in pieces)))


def _overlapping_rects(rects: list[Rect]) -> list[list[int]]:
    """For each (top, left, bottom, right) rectangle, the others it overlaps (a sweep along x)."""
    out: list[list[int]] = [[] for _ in rects]
    order = sorted(range(len(rects)), key=lambda i: rects[i][1])
    for n, i in enumerate(order):
        for j in order[n + 1:]:
            if rects[j][1] >= rects[i][3]:
                break
            if rects[j][0] < rects[i][2] and rects[i][0] < rects[j][2]:
                out[i].append(j)
                out[j].append(i)
    return out
