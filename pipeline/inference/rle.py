"""COCO RLE masks of large images without a full-image array per mask.

A COCO RLE (``pycocotools.mask``) runs over the image's pixels in column-major order
(down each column, then the next column), alternating counts of 0s and 1s starting with
0s; "compressed" counts are a string of 6-bit characters (``rle_counts`` reads them back).

- ``from_crop``: a mask given as its bounding crop (h, w) and where the crop lies -> the
  image-sized RLE, in time and memory of the crop, not of the image;
- ``runs``: the (start, stop) column-major offsets of a mask's runs of 1s, so that an
  image-sized label picture can be painted run by run (``pipeline.viz.instances.instance_ids``)
  rather than by decoding one image-sized array per mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def from_crop(crop: np.ndarray, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """The COCO RLE (counts as str) of an (height, width) mask that is 0 outside ``crop``:
    (h, w) bool placed with its top-left pixel at (top, left)."""
    from pycocotools import mask as rle

    h, w = crop.shape
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"a {h}x{w} crop at ({top}, {left}) is not inside a {height}x{width} image")
    padded = np.zeros((w, h + 2), np.int8)          # a column of the crop per row, 0 above and below
    padded[:, 1:-1] = crop.T
    step = np.diff(padded, axis=1)
    start_col, start_row = np.nonzero(step == 1)     # runs of 1s begin at crop row start_row ...
    stop_col, stop_row = np.nonzero(step == -1)      # ... and end before stop_row, column by column
    starts = (left + start_col).astype(np.int64) * height + top + start_row
    stops = (left + stop_col).astype(np.int64) * height + top + stop_row
    # A run that reaches the bottom of the image goes on at the top of the next column.
    joined = np.nonzero(stops[:-1] == starts[1:])[0]
    starts, stops = np.delete(starts, joined + 1), np.delete(stops, joined)
    edges = np.empty(2 * len(starts), np.int64)
    edges[0::2], edges[1::2] = starts, stops
    counts = np.diff(np.concatenate([[0], edges, [height * width]]))
    if len(counts) > 1 and counts[-1] == 0:          # ends in a run of 1s: no trailing count (as encode)
        counts = counts[:-1]
    height, width = int(height), int(width)
    encoded = rle.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def rle_counts(mask: dict[str, Any]) -> np.ndarray:
    """The alternating 0s / 1s run lengths (int64) of a COCO RLE, compressed or not.

    Compressed counts: each count is written in 5-bit groups, least significant first, each
    group a character ``48 + group`` with 0x20 set while more groups follow; the last group's
    0x10 bit is the sign. From the fourth count on, the count minus the one two before it
    (the previous count of the same kind) is written instead."""
    counts = mask["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, np.int64)
    text = counts.encode("ascii") if isinstance(counts, str) else counts
    out: list[int] = []
    value = shift = 0
    for char in text:
        group = char - 48
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift                       # sign-extend the last group
        if len(out) > 2:
            value += out[-2]
        out.append(value)
        value = shift = 0
    return np.asarray(out, np.int64)


def runs(mask: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops): the column-major pixel offsets of each run of 1s of a COCO RLE
    (pixel (y, x) is offset x * height + y), stops exclusive."""
    ends = np.cumsum(rle_counts(mask))
    return ends[0:-1:2], ends[1::2]
