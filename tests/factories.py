"""Tiny generated datasets for tests: a few small images and masks written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, h: int = 24, w: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def blob_mask(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
    """(h, w) uint8 with every class present: horizontal bands plus a random square."""
    mask = (np.arange(h)[:, None] * num_classes // h).repeat(w, axis=1).astype(np.uint8)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y:y + h // 4, x:x + w // 4] = rng.integers(0, num_classes)
    return mask


def make_folder_dataset(
    root: Path, n: int = 12, *, num_classes: int = 2, binary_255: bool = False,
    splits: tuple[str, ...] | None = None, size: tuple[int, int] = (24, 32), seed: int = 0,
    image_suffix: str = ".png",
) -> dict[str, np.ndarray]:
    """``root/images`` and ``root/masks`` (flat, or one subfolder per split).

    Returns the class-index mask written for each image key, as training should see it
    (before any 0/255 encoding).
    """
    rng = np.random.default_rng(seed)
    truth = {}
    h, w = size
    for i in range(n):
        sub = f"{splits[i % len(splits)]}/" if splits else ""
        key = f"{sub}img_{i:03d}"
        mask = blob_mask(rng, h, w, num_classes)
        stored = (mask * 255).astype(np.uint8) if binary_255 else mask
        img_path = root / "images" / f"{key}{image_suffix}"
        mask_path = root / "masks" / f"{key}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        random_image(rng, h, w).save(img_path)
        Image.fromarray(stored).save(mask_path)
        truth[key] = mask
    return truth
