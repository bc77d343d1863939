"""Instance rows to training tensors: decode, augment (train only), normalise, batch.

A row's ``instances`` (``pipeline.data.shards``: class, box, iscrowd, COCO RLE per
instance) become Mask R-CNN's targets: per image {"boxes" (K, 4) float32 x0 y0 x1 y1,
"labels" (K,) int64 0-based, "masks" (K, H, W) uint8}, plus "truth", the image's
``Instances`` as scored (unaugmented rows only: validation).

Augmentation moves each instance's mask with the image (albumentations, the same
geometry as semantic training: random scale, pad, crop, flip, colour jitter); the boxes
are then taken from the moved masks, so box and mask always agree, and an instance the
crop cut away entirely (or to fewer than ``MIN_PIXELS`` pixels) leaves the targets. Crowd
regions are not objects to detect: they stay out of the training targets and are scored
as COCOeval's ignore regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.data.augment import normalise
from pipeline.data.shards import decode_image, decode_instances

MIN_PIXELS = 4     # an instance cropped to fewer pixels than this is no longer a target


def train_transform(crop: tuple[int, int], scale: tuple[float, float], jitter: float) -> A.Compose:
    """Random scale in ``scale``, pad and random crop to ``crop`` (h, w), horizontal and
    vertical flips, colour jitter of strength ``jitter`` (0 turns it off); masks move with
    the image (nearest-neighbour, exact centres as in semantic training)."""
    h, w = crop
    steps = [
        A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), p=1.0,
                      mask_interpolation=cv2.INTER_NEAREST_EXACT),
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        A.RandomCrop(height=h, width=w),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
    ]
    if jitter > 0:
        steps.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                                   hue=min(jitter / 4, 0.5), p=0.8))
    return A.Compose(steps)


def decode_masks(instances: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(K, H, W) uint8 masks of a row's instances."""
    from pycocotools import mask as rle

    if not len(instances):
        return np.zeros((0, height, width), np.uint8)
    codes = [{"size": [height, width], "counts": bytes(i["rle"])} for i in instances]
    return np.ascontiguousarray(rle.decode(codes).transpose(2, 0, 1))


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """(K, 4) float32 tight boxes x0 y0 x1 y1 (x1, y1 one past the last pixel) of (K, H, W) masks."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if len(ys):
            boxes[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def _targets(image: np.ndarray, instances: Sequence[dict], transform: A.Compose | None):
    h, w = image.shape[:2]
    objects = [i for i in instances if not i["iscrowd"]]
    masks = decode_masks(objects, h, w)
    labels = np.asarray([int(i["class"]) for i in objects], np.int64)
    if transform is not None:
        out = transform(image=image, masks=list(masks))
        image = out["image"]
        masks = np.asarray(out["masks"], np.uint8).reshape(len(objects), *image.shape[:2])
        keep = masks.reshape(len(masks), -1).sum(axis=1) >= MIN_PIXELS
        masks, labels = masks[keep], labels[keep]
    target = {"boxes": torch.from_numpy(boxes_of(masks)), "labels": torch.from_numpy(labels),
              "masks": torch.from_numpy(np.ascontiguousarray(masks))}
    if transform is None:
        target["truth"] = decode_instances({"height": h, "width": w, "instances": instances})
    return image, target


def collate(images: Sequence[bytes], targets: Sequence[Sequence[dict]], *, mean: Sequence[float],
            std: Sequence[float], ignore_index: int, transform: A.Compose | None = None,
            ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Encoded rows -> (images (N, 3, H, W) float32 normalised, one target dict per image).
    Images of different sizes are padded bottom/right to the largest (masks with 0: the
    padding belongs to no object). ``ignore_index`` plays no part (the signature is the task's)."""
    pairs = [_targets(decode_image(data), rows, transform)
             for data, rows in zip(images, targets, strict=True)]
    h = max(image.shape[0] for image, _ in pairs)
    w = max(image.shape[1] for image, _ in pairs)
    batch = np.zeros((len(pairs), h, w, 3), np.uint8)
    out = []
    for i, (image, target) in enumerate(pairs):
        ih, iw = image.shape[:2]
        batch[i, :ih, :iw] = image
        if (ih, iw) != (h, w):
            padded = torch.zeros((len(target["masks"]), h, w), dtype=torch.uint8)
            padded[:, :ih, :iw] = target["masks"]
            target["masks"] = padded
        out.append(target)
    return normalise(batch, mean, std), out
