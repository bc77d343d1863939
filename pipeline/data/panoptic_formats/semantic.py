"""Panoptic labels derived from a semantic dataset (camvid, pet, voc, folder).

``prepare.thing_classes`` names the thing classes: each connected component (8-connected)
of a thing class's mask becomes an instance, every other class one stuff segment per
image, and the ignore label void. Touching or overlapping objects of one class merge into
one instance: an approximation of the true instances, which semantic masks do not hold.
Components smaller than ``prepare.min_component_area`` pixels (at native size) are
annotation fragments rather than objects (a quarter of CamVid's thing components have
fewer than 10 pixels): they become void, so that no metric counts them as objects.
CamVid with Car, Pedestrian and Bicyclist as things and the other eight classes as stuff
(the Cityscapes convention) is the intended benchmark.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config.params import PrepareParams
from pipeline.data.checks import MaskError, decode_mask
from pipeline.data.datasets import ClassSpec, class_spec, list_samples
from pipeline.data.panoptic_formats.common import LabelError, Labels, Listing, PanopticRecord

CONNECTIVITY = 8
COMPONENT_BITS = 32        # key = (class + 1) << 32 | component: room for any image's components
MERGE_NOTE = (f"Thing instances are the {CONNECTIVITY}-connected components of each thing class's mask: "
              "touching objects of one class merge into one instance (an approximation).")
FRAGMENT_NOTE = "Thing components under {} pixels (native size) are fragments, made void."


def list_images(dataset: str, root: Path, cfg: PrepareParams) -> Listing:
    spec = class_spec(dataset, cfg)
    if cfg.thing_classes is None:
        raise ValueError(f"prepare.task panoptic from the semantic dataset {dataset!r} needs "
                         f"prepare.thing_classes: the names, among {list(spec.names)}, of the classes "
                         "whose objects are counted (e.g. [Car, Pedestrian, Bicyclist] for camvid)")
    unknown = sorted(set(cfg.thing_classes) - set(spec.names))
    if unknown:
        raise ValueError(f"prepare.thing_classes {unknown} are not classes of {dataset}: {list(spec.names)}")
    things = frozenset(spec.names.index(n) for n in cfg.thing_classes)
    records = [PanopticRecord(rel=s.image.relative_to(root).as_posix() if s.image.is_relative_to(root)
                              else str(s.image), image=s.image, label=s.mask, split=s.split, id=s.id,
                              problems=[] if s.mask else ["missing mask"])
               for s in list_samples(dataset, root, cfg)]
    reader = partial(read_mask, spec=spec, things=things, min_area=cfg.min_component_area)
    notes = [MERGE_NOTE] + ([FRAGMENT_NOTE.format(cfg.min_component_area)] if cfg.min_component_area else [])
    return Listing(spec.names, tuple(i in things for i in range(spec.num_classes)), spec.palette,
                   spec.ignore_index, reader, records, notes=notes)


def read_mask(record: PanopticRecord, spec: ClassSpec, things: frozenset[int], min_area: int) -> Labels:
    """A semantic mask -> ``Labels``: thing components keyed (class + 1) << 32 | component,
    stuff (class + 1) << 32, the ignore label and components under ``min_area`` pixels void."""
    try:
        mask = decode_mask(record.label.read_bytes(), spec)
    except (MaskError, UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise LabelError(f"unreadable mask {record.label}: {exc}") from None
    labels = Labels(np.zeros(mask.shape, np.int64), {})
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < spec.num_classes or v == spec.ignore_index)]
    if bad:
        labels.problems.append(f"label values {bad[:10]} outside classes 0..{spec.num_classes - 1} "
                               f"(ignore label {spec.ignore_index}) in {record.label}")
        return labels
    for cls in (int(v) for v in values if v != spec.ignore_index):
        where = mask == cls
        base = (cls + 1) << COMPONENT_BITS
        if cls in things:
            n, comp, stats, _ = cv2.connectedComponentsWithStats(where.astype(np.uint8),
                                                                 connectivity=CONNECTIVITY)
            kept = [c for c in range(1, n) if stats[c, cv2.CC_STAT_AREA] >= min_area]   # 0: background
            where &= np.isin(comp, kept)
            labels.keys[where] = comp[where].astype(np.int64) | base
            labels.segments.update({base | c: (cls, False) for c in kept})
            labels.voided += n - 1 - len(kept)
        else:
            labels.keys[where] = base
            labels.segments[base] = (cls, False)
    return labels
