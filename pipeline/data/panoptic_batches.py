"""Panoptic rows to training tensors: decode, augment (train only), normalise, batch.

A row's ``panoptic`` PNG and ``segments`` (``pipeline.data.shards.PANOPTIC_SCHEMA``) become
per image {"boxes" (K, 4) float32 x0 y0 x1 y1, "labels" (K,) int64 dataset class indices,
"masks" (K, H, W) uint8, "semantic" (H, W) int64 class per pixel}, plus "truth", the
image's ``Panoptic`` as scored (unaugmented rows only: validation). The K segments are every
segment but crowds, stuff included: the model knows its thing classes and takes from the
list what its heads learn (Panoptic FPN: things to Mask R-CNN, every class to the semantic
branch). In "semantic", void and crowd pixels hold ``ignore_index``.

Augmentation is the semantic task's (``pipeline.data.augment``: random scale, pad, crop,
horizontal flip, colour jitter) applied to the image and its segment-id map together
(nearest-neighbour, so ids stay ids; padding is void); masks and boxes are then taken from
the moved map, so they always agree, and a segment the crop cut to fewer than
``MIN_PIXELS`` pixels leaves the instance targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data.augment import normalise
from pipeline.data.instance_batches import MIN_PIXELS, boxes_of
from pipeline.data.shards import decode_image
from pipeline.metrics.panoptic_types import Panoptic, Segment, decode_png


def segments_of(rows: Sequence[dict] | None) -> list[Segment]:
    """A prepared row's ``segments`` as ``Segment``s."""
    return [Segment(id=int(s["id"]), category=int(s["class"]), iscrowd=bool(s["iscrowd"]))
            for s in (rows if rows is not None else [])]


def _targets(image: np.ndarray, png: bytes, segment_rows: Sequence[dict], ignore_index: int,
             transform: Any) -> tuple[np.ndarray, dict[str, Any]]:
    ids = decode_png(png)
    segments = segments_of(segment_rows)
    if transform is not None:
        out = transform(image=image, mask=ids)
        image, ids = out["image"], np.asarray(out["mask"], np.int32)
    truth = Panoptic(ids=ids, segments=segments)
    objects = [s for s in segments if not s.iscrowd]
    masks = (ids[None] == np.asarray([s.id for s in objects], np.int32)[:, None, None]).astype(np.uint8)
    keep = masks.reshape(len(masks), -1).sum(axis=1) >= MIN_PIXELS
    masks = masks[keep]
    labels = np.asarray([s.category for s in objects], np.int64)[keep]
    target = {"boxes": torch.from_numpy(boxes_of(masks)), "labels": torch.from_numpy(labels),
              "masks": torch.from_numpy(np.ascontiguousarray(masks)),
              "semantic": torch.from_numpy(truth.semantic(ignore_index).astype(np.int64))}
    if transform is None:
        target["truth"] = truth
    return image, target


def collate(images: Sequence[bytes], targets: Sequence[tuple[bytes, Sequence[dict]]], *,
            mean: Sequence[float], std: Sequence[float], ignore_index: int, transform: Any = None,
            ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Encoded rows -> (images (N, 3, H, W) float32 normalised, one target dict per image).
    ``targets``: per row its (panoptic PNG bytes, segments). Images of different sizes are
    padded bottom/right to the largest (masks with 0, "semantic" with ``ignore_index``)."""
    pairs = [_targets(decode_image(data), png, segments, ignore_index, transform)
             for data, (png, segments) in zip(images, targets, strict=True)]
    h = max(image.shape[0] for image, _ in pairs)
    w = max(image.shape[1] for image, _ in pairs)
    batch = np.zeros((len(pairs), h, w, 3), np.uint8)
    for i, (image, target) in enumerate(pairs):
        ih, iw = image.shape[:2]
        batch[i, :ih, :iw] = image
        if (ih, iw) != (h, w):
            masks = torch.zeros((len(target["masks"]), h, w), dtype=torch.uint8)
            masks[:, :ih, :iw] = target["masks"]
            semantic = torch.full((h, w), ignore_index, dtype=torch.int64)
            semantic[:ih, :iw] = target["semantic"]
            target["masks"], target["semantic"] = masks, semantic
    return normalise(batch, mean, std), [target for _, target in pairs]

