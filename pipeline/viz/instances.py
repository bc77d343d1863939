"""Pictures of instances (``pipeline.metrics.instance.Instances``) for people, answers and the
dashboard.

- ``colours``: n distinct colours, hues a golden-ratio step apart (neighbours in score order
  never look alike), brightness alternating.
- ``instance_ids``: the (H, W) instance-id image: 0 = no instance, i + 1 = instance i; where
  instances overlap, the earlier one (in score order: the higher score) wins. Painted run by
  run from the RLEs (``pipeline.inference.rle.runs``): no image-sized array per instance.
- ``overlay``: the image with each instance in its own colour (blended with ``alpha``), its
  outline in that colour at full strength, and a label "class score" at its box's top-left
  corner (the ``MAX_LABELS`` highest-scored ones: more would hide the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.inference.rle import runs
from pipeline.metrics.instance import Instances

GOLDEN = 0.618033988749895       # hue step, in turns
MAX_LABELS = 100
FONT = cv2.FONT_HERSHEY_SIMPLEX


def colours(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB, distinct for neighbours: hue i x golden ratio, saturation 0.75,
    value alternating 0.95 / 0.75."""
    if n == 0:
        return np.zeros((0, 3), np.uint8)
    i = np.arange(n, dtype=np.float32)
    hsv = np.stack([(i * GOLDEN % 1.0) * 360.0, np.full(n, 0.75, np.float32),
                    np.where(i % 2 == 0, 0.95, 0.75).astype(np.float32)], axis=1)
    rgb = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    return np.round(rgb * 255).astype(np.uint8)


def instance_ids(instances: Instances) -> np.ndarray:
    """(H, W) instance ids: uint16 (int32 above 65,535 instances); 0 where none, i + 1 for
    instance i, the lowest index winning where instances overlap."""
    h, w, n = instances.height, instances.width, len(instances)
    flat = np.zeros(h * w, np.uint16 if n <= np.iinfo(np.uint16).max else np.int32)   # column-major
    for i in reversed(range(n)):                      # the earliest painted last: it wins
        starts, stops = runs(instances.masks[i])
        lengths = stops - starts
        if not lengths.sum():
            continue
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        flat[offsets + np.arange(lengths.sum())] = i + 1
    return np.ascontiguousarray(flat.reshape(w, h).T)


def _outline(ids: np.ndarray, thickness: int) -> np.ndarray:
    """(H, W) ids of outline pixels (0 elsewhere): an instance's pixels next to another id,
    widened to ``thickness`` pixels (inwards and outwards; the higher id where two meet)."""
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    line = np.where(edge, ids, 0).astype(ids.dtype)
    if thickness > 1 and line.dtype == np.uint16:     # OpenCV's dilation takes no int32
        line = cv2.dilate(line, np.ones((thickness, thickness), np.uint8))
    return line


def overlay(image: np.ndarray, instances: Instances, class_names: Sequence[str], alpha: float = 0.5,
            max_labels: int = MAX_LABELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB image + its instances (in score order) -> (H, W, 3) uint8 RGB."""
    h, w = image.shape[:2]
    if (h, w) != (instances.height, instances.width):
        raise ValueError(f"instances of {instances.height}x{instances.width} for a {h}x{w} image")
    ids = instance_ids(instances)
    palette = np.vstack([np.zeros((1, 3), np.uint8), colours(len(instances))])
    inside = ids > 0
    out = image.copy()
    if inside.any():
        out[inside] = cv2.addWeighted(image[inside], 1.0 - alpha, palette[ids[inside]], alpha, 0.0)
    line = _outline(ids, thickness=max(1, round(min(h, w) / 400)))
    on_line = line > 0
    out[on_line] = palette[line[on_line]]
    for i in range(min(len(instances), max_labels)):
        name = class_names[instances.classes[i]] if instances.classes[i] < len(class_names) else "?"
        _label(out, f"{name} {instances.scores[i]:.2f}" if instances.scores else name, instances.boxes[i],
               palette[i + 1])
    return out


def _label(out: np.ndarray, text: str, box: Sequence[float], rgb: np.ndarray) -> None:
    """``text`` on a patch of ``rgb`` above the box's top-left corner (inside it at the top edge)."""
    h, w = out.shape[:2]
    scale = max(0.35, min(h, w) / 1200)
    thick = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    x0 = int(min(max(box[0], 0), max(w - tw - 2, 0)))
    y0 = int(box[1])
    top = y0 - th - base - 2 if y0 - th - base - 2 >= 0 else min(y0, max(h - th - base - 2, 0))
    colour = tuple(int(c) for c in rgb)
    ink = (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)
    cv2.rectangle(out, (x0, top), (x0 + tw + 2, top + th + base + 2), colour, -1)
    cv2.putText(out, text, (x0 + 1, top + th + 1), FONT, scale, ink, thick, cv2.LINE_AA)
