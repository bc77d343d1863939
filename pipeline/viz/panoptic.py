"""Pictures of panoptic labellings (``pipeline.metrics.panoptic_types.Panoptic``) for people,
answers and the dashboard.

- ``shades``: n shades of one class colour: the colour itself first, then lighter and darker
  ones, a golden-ratio step apart so that neighbours in the list never look alike.
- ``segment_colours``: each segment's colour: a stuff segment its class colour from the
  dataset's palette; the k-th thing segment of a class (in ``segments`` order: score order
  for predictions) the k-th shade of its class colour.
- ``overlay``: the image with every segment in its colour blended with ``alpha``, each thing
  segment (crowd regions included) outlined in its colour at full strength; void pixels
  left as they are.
- ``panel``: image | truth | prediction, titled, no legend (the instance task's panel's shape).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.metrics.panoptic_types import Panoptic
from pipeline.viz import overlays
from pipeline.viz.instances import GOLDEN, _outline

MAX_MIX = 0.6     # the palest shade is 60% of the way to white, the darkest 60% to black


def shades(rgb: Sequence[int], n: int) -> np.ndarray:
    """(n, 3) uint8: ``rgb`` itself, then mixed towards white or black by up to ``MAX_MIX``."""
    k = np.arange(n, dtype=np.float64)
    mix = 2 * MAX_MIX * ((k * GOLDEN + 0.5) % 1.0 - 0.5)      # 0 for k = 0, then in [-0.6, 0.6]
    base = np.asarray(rgb, np.float64)[None]
    target = np.where(mix[:, None] > 0, 255.0, 0.0)
    return np.round(base + np.abs(mix)[:, None] * (target - base)).astype(np.uint8)


def segment_colours(panoptic: Panoptic, palette: Sequence[Sequence[int]],
                    isthing: Sequence[bool]) -> dict[int, np.ndarray]:
    """{segment id: (3,) uint8 RGB}: stuff in its class colour, things in shades of theirs."""
    for s in panoptic.segments:
        if not 0 <= s.category < min(len(palette), len(isthing)):
            raise ValueError(f"segment {s.id} has class {s.category}; the palette has {len(palette)} "
                             f"colours and isthing {len(isthing)} flags")
    per_class = Counter(s.category for s in panoptic.segments if isthing[s.category])
    tables = {c: shades(palette[c], n) for c, n in per_class.items()}
    seen: Counter[int] = Counter()
    out = {}
    for s in panoptic.segments:
        if isthing[s.category]:
            out[s.id] = tables[s.category][seen[s.category]]
            seen[s.category] += 1
        else:
            out[s.id] = np.asarray(palette[s.category], np.uint8)
    return out


def overlay(image: np.ndarray, panoptic: Panoptic, palette: Sequence[Sequence[int]], isthing: Sequence[bool],
            alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB image + its ``Panoptic`` -> (H, W, 3) uint8 RGB (see the module doc)."""
    h, w = image.shape[:2]
    if (h, w) != panoptic.ids.shape:
        raise ValueError(f"a panoptic labelling of {panoptic.height}x{panoptic.width} for a {h}x{w} image")
    colours = segment_colours(panoptic, palette, isthing)
    things = {s.id for s in panoptic.segments if isthing[s.category]}
    present, inverse = np.unique(panoptic.ids, return_inverse=True)
    inverse = inverse.reshape(h, w)
    table = np.zeros((len(present), 3), np.uint8)
    painted = np.zeros(len(present), bool)
    outlined = np.zeros(len(present), bool)
    for j, segment_id in enumerate(present.tolist()):
        if segment_id in colours:
            table[j], painted[j], outlined[j] = colours[segment_id], True, segment_id in things
    out = image.copy()
    inside = painted[inverse]
    if inside.any():
        out[inside] = cv2.addWeighted(image[inside], 1.0 - alpha, table[inverse[inside]], alpha, 0.0)
    # Outlines of things only: stuff and void are 0, thing j is j + 1.
    index_type = np.uint16 if len(present) < np.iinfo(np.uint16).max else np.int32
    thing_index = np.where(outlined[inverse], inverse + 1, 0).astype(index_type)
    line = _outline(thing_index, thickness=max(1, round(min(h, w) / 400)))
    on_line = line > 0
    out[on_line] = table[line[on_line].astype(np.int64) - 1]
    return out


def panel(image: np.ndarray, truth: Panoptic, predicted: Panoptic, palette: Sequence[Sequence[int]],
          isthing: Sequence[bool], title: str = "") -> np.ndarray:
    """Image | truth | prediction (stuff in class colours, things in shades, outlined), one RGB picture."""
    views = [overlays.titled(image, title or "image")] + [
        overlays.titled(overlay(image, p, palette, isthing), f"{name}: {len(p.segments)} segments")
        for name, p in (("truth", truth), ("prediction", predicted))]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([views[0], gap, views[1], gap, views[2]])
