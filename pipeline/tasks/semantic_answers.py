"""Semantic segmentation's answers to ``/predict``: the class-index mask as a palette PNG,
an overlay JPEG, or JSON with per-class pixel counts, fractions and COCO RLE."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.tasks.base import JSON
from pipeline.tasks.options import REFINE, QueryOption
from pipeline.viz import overlays

ANSWERS = {"png": "image/png", "json": JSON, "overlay": "image/jpeg"}
QUERY_OPTIONS = {REFINE: QueryOption.choice(
    ("none", "crf", "grabcut"),
    "refine the mask with the image: a dense CRF, or GrabCut (two-class models); default: the model's own")}


def answer(options, image: np.ndarray, mask: np.ndarray, meta) -> tuple[Any, str]:
    """(body, media type) in ``options.format``: PNG or JPEG bytes, or a JSON-ready dict."""
    if options.format == "png":
        return overlays.palette_png(mask, meta.palette, fast=True), ANSWERS["png"]
    if options.format == "overlay":
        blended = overlays.blend(image, overlays.colorize(mask, meta.palette), options.alpha)
        return overlays.jpeg(blended), ANSWERS["overlay"]
    return mask_summary(mask, meta.class_names, meta.palette), JSON


def mask_summary(mask: np.ndarray, names, palette) -> dict[str, Any]:
    """Per-class pixel counts, fractions and COCO RLE of a class-index mask."""
    from pycocotools import mask as rle

    h, w = mask.shape
    counts = np.bincount(mask.ravel(), minlength=len(names))
    present = [c for c in range(len(names)) if counts[c] > 0]
    encoded = {}
    if present:
        stack = np.asfortranarray(np.stack([mask == c for c in present], axis=2).astype(np.uint8))
        encoded = dict(zip(present, rle.encode(stack), strict=True))
    classes = []
    for c, name in enumerate(names):
        code = encoded.get(c)
        classes.append({
            "index": c, "name": name, "color": list(palette[c]),
            "pixels": int(counts[c]), "fraction": float(counts[c]) / (h * w),
            "rle": None if code is None else {"size": [h, w], "counts": code["counts"].decode("ascii")},
        })
    return {"width": w, "height": h, "classes": classes}
