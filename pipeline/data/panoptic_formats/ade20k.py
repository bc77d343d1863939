"""ADE20K's full-dataset labels: ``X_seg.png`` beside each image ``X.jpg`` (any folders;
``training/`` and ``validation/`` give the split).

The encoding, as the ADE20K toolkit documents it: a pixel's object class is ``R / 10 * 256 +
G`` (integer division; 0 = unlabelled, void here) and its object instance is given by ``B``
(each object a B value of its own). Part masks (``X_parts_N.png``) are not read.

Class names: ``classes.txt`` at the folder's root, one class per line, ``<value> <name>``:
the class value of the seg PNGs, then its name (the rest of the line: ADE's object names
hold spaces and commas). The lines' order is the class order; a value the PNGs hold that is
not listed is a problem (a category not in the class list). Thing classes: named by
``prepare.thing_classes``. Each thing object (class, B) becomes a segment; every object of a
stuff class in one image merges into one segment (ADE20K gives stuff objects instances too;
panoptic stuff has one segment per image).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config.params import PrepareParams
from pipeline.data.datasets import IMAGE_SUFFIXES, voc_palette
from pipeline.data.instance_formats.common import split_named
from pipeline.data.panoptic_formats.common import (
    Labels,
    Listing,
    PanopticRecord,
    read_label_png,
    rgb_channels,
)

CLASS_FILE = "classes.txt"
SEG_SUFFIX = "_seg.png"
NOT_IMAGES = re.compile(r"_(seg|parts_\d+)$")     # label files beside the images
MAX_VALUE = 25 * 256 + 255                        # R / 10 * 256 + G at R = G = 255


def read_classes(root: Path) -> tuple[tuple[str, ...], dict[int, int]]:
    """(names, class value -> class index) from ``classes.txt``; raises naming the line."""
    path = root / CLASS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset ade20k needs {CLASS_FILE} at the folder's root, one "
                                "'<value> <name>' line per class (value: R / 10 * 256 + G of the seg PNGs)")
    names, index = [], {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        value, _, name = line.strip().partition(" ")
        name = name.strip()
        if not value.isdigit() or not name or not 0 < int(value) <= MAX_VALUE:
            raise ValueError(f"{path} line {n}: expected '<value> <name>' with a value in 1..{MAX_VALUE} "
                             f"(0 is unlabelled), got {line.strip()!r}")
        if int(value) in index or name in names:
            raise ValueError(f"{path} line {n}: value {value} or name {name!r} listed twice")
        index[int(value)] = len(names)
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no classes")
    return tuple(names), index


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    if cfg.classes is not None:
        raise ValueError(f"prepare.classes is not for dataset ade20k: the classes are {CLASS_FILE}'s; "
                         "set prepare.classes to null")
    names, index = read_classes(root)
    if cfg.thing_classes is None:
        raise ValueError(f"dataset ade20k needs prepare.thing_classes: the names in {CLASS_FILE} whose "
                         "objects are things (the others are stuff)")
    unknown = sorted(set(cfg.thing_classes) - set(names))
    if unknown:
        raise ValueError(f"prepare.thing_classes {unknown} are not in {root / CLASS_FILE}")
    if cfg.ignore_index < len(names):
        raise ValueError(f"prepare.ignore_index {cfg.ignore_index} collides with class "
                         f"{names[cfg.ignore_index]!r} of {len(names)}; use a value >= {len(names)}")
    isthing = tuple(n in cfg.thing_classes for n in names)
    listing = Listing(names, isthing, voc_palette(len(names) + 1)[1:], cfg.ignore_index,
                      partial(read_seg, index=index, isthing=isthing), [],
                      notes=["ADE20K: every object of a stuff class in one image merges into one segment."])
    labels = {p.with_name(p.name[:-len(SEG_SUFFIX)]): p for p in sorted(root.rglob("*" + SEG_SUFFIX))}
    images: dict[Path, list[Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not NOT_IMAGES.search(p.stem):
            images.setdefault(p.with_suffix(""), []).append(p)
    for stem, label in labels.items():
        if stem not in images:
            listing.problems.append({"file": str(label), "reasons": ["label without image: no image "
                                                                     f"{stem.name}.* beside it"]})
    for stem, files in images.items():
        rel = files[0].relative_to(root).as_posix()
        record = PanopticRecord(rel=rel, image=files[0], label=labels.get(stem), official=split_named(rel),
                                id=stem.name)      # ADE20K's file names are unique
        if len(files) > 1:
            record.problems.append(f"several images for one label: {', '.join(f.name for f in files)}")
        if record.label is None:
            record.problems.append(f"missing label {stem.name}{SEG_SUFFIX}")
        listing.images.append(record)
    if not listing.images and not listing.problems:
        raise FileNotFoundError(f"{root}: no images and no *{SEG_SUFFIX} files")
    return listing


def read_seg(record: PanopticRecord, index: dict[int, int], isthing: tuple[bool, ...]) -> Labels:
    """An ADE20K seg PNG -> ``Labels``: things keyed (class + 1) * 256 + B, stuff (class + 1) * 256."""
    rgb = rgb_channels(read_label_png(record.label), record.label, "an ADE20K seg PNG")
    name = record.label.name
    value = rgb[..., 0] // 10 * 256 + rgb[..., 1]
    lut = np.full(MAX_VALUE + 1, -1, np.int64)
    for v, cls in index.items():
        lut[v] = cls
    cls = lut[value]
    labels = Labels(np.zeros(value.shape, np.int64), {})
    unknown = (cls < 0) & (value > 0)
    if unknown.any():
        found, counts = np.unique(value[unknown], return_counts=True)
        labels.problems += [f"{name} segment of class value {v} ({n} pixels): not in {CLASS_FILE}"
                            for v, n in zip(found.tolist(), counts.tolist(), strict=True)]
        return labels
    thing = np.asarray(isthing, bool)[np.maximum(cls, 0)] & (value > 0)
    labels.keys = np.where(value > 0, (cls + 1) * 256 + np.where(thing, rgb[..., 2], 0), 0)
    labels.segments = {int(k): (int(k) // 256 - 1, False) for k in np.unique(labels.keys) if k}
    return labels
