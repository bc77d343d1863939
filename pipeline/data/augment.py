"""From prepared rows to training tensors: decode, augment (train only), normalise, batch.

The same geometry is applied to image and mask (albumentations handles both); padding
of the mask uses the ignore label so padded pixels count in no loss or metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.data.shards import decode_image, decode_mask


def train_transform(
    crop: tuple[int, int], scale: tuple[float, float], jitter: float, ignore_index: int,
    seed: int | None = None,
) -> A.Compose:
    """Random scale in ``scale``, pad (mask with ignore) and random crop to ``crop`` (h, w),
    horizontal flip, colour jitter of strength ``jitter`` (0 turns it off)."""
    h, w = crop
    steps = [
        # INTER_NEAREST_EXACT samples the mask at the pixel centres the image's bilinear
        # resize uses; OpenCV's default INTER_NEAREST lands up to one source pixel off
        # (tests/data/test_augment.py).
        A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), p=1.0,
                      mask_interpolation=cv2.INTER_NEAREST_EXACT),
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0,
                      fill_mask=ignore_index),
        A.RandomCrop(height=h, width=w),
        A.HorizontalFlip(p=0.5),
    ]
    if jitter > 0:
        steps.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter,
                                   hue=min(jitter / 4, 0.5), p=0.8))
    return A.Compose(steps, seed=seed)


def collate(
    images: Sequence[bytes], masks: Sequence[bytes], *, mean: Sequence[float], std: Sequence[float],
    ignore_index: int, transform: A.Compose | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded rows -> (images (N, 3, H, W) float32 normalised, masks (N, H, W) int64).

    Without a transform, images of different sizes are padded bottom/right to the largest
    in the batch (images with 0, masks with ``ignore_index``).
    """
    pairs = []
    for img_bytes, mask_bytes in zip(images, masks, strict=True):
        image, mask = decode_image(img_bytes), decode_mask(mask_bytes)
        if transform is not None:
            out = transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        pairs.append((image, mask))
    h = max(p[0].shape[0] for p in pairs)
    w = max(p[0].shape[1] for p in pairs)
    batch_img = np.zeros((len(pairs), h, w, 3), np.uint8)
    batch_mask = np.full((len(pairs), h, w), ignore_index, np.int64)
    for i, (image, mask) in enumerate(pairs):
        batch_img[i, : image.shape[0], : image.shape[1]] = image
        batch_mask[i, : mask.shape[0], : mask.shape[1]] = mask
    return normalise(batch_img, mean, std), torch.from_numpy(batch_mask)


def normalise(batch_img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, (x / 255 - mean) / std per channel.

    Normalised in NumPy, single-threaded, not with torch ops: Ray Data runs this in its
    collate thread while the training step runs, and a torch op there starts a second
    OpenMP thread pool in the process. libgomp then counts more pool threads than CPUs
    and stops spin-waiting at its barriers, so every parallel region of the training
    step waits for a futex wake-up: on the 2-core machine a worker of 2 threads trained
    about a tenth slower, its two threads switching out ~1,500 times a step instead of ~30.
    """
    std = np.asarray(std, np.float32)
    scale, shift = 1.0 / (255.0 * std), -np.asarray(mean, np.float32) / std
    x = batch_img.astype(np.float32)
    x *= scale
    x += shift
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
