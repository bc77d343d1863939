"""LabelMe JSON (4.x and 5.x): one file per image with ``shapes`` (``label``, ``points``,
``group_id``, ``shape_type``), the image by ``imagePath`` relative to the JSON (or, when
that file is absent, the base64 ``imageData`` the JSON carries).

- Shapes of one ``group_id`` and label make one instance (an object split in parts);
  shapes without a group are an instance each.
- ``polygon`` (also a missing ``shape_type``), ``rectangle`` (two corners), ``circle``
  (centre and a point on the circle), and LabelMe 5's ``mask`` (a PNG of the box given by
  two corners) are regions; ``line``, ``linestrip``, ``point`` and ``points`` are not: an
  instance problem.
- The label ``__ignore__`` marks a region left out of training and scoring (the prepared
  ``ignore`` column).
- Classes: ``prepare.classes``, else ``labels.txt`` at the folder's root (LabelMe's own
  ``--labels`` file, less ``__ignore__`` and ``_background_``).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.data.instance_formats.common import (
    IGNORE_LABEL,
    MASK_PATCH,
    OUTLINE,
    POLYGON,
    ImageRecord,
    InstanceSpec,
    Listing,
    Region,
    ellipse,
    load_classes_txt,
    rectangle,
    split_named,
)

NOT_REGIONS = {"line", "linestrip", "point", "points"}


def class_names(root: Path, cfg: PrepareParams) -> tuple[str, ...]:
    if cfg.classes is not None:
        return tuple(c for c in cfg.classes if c != IGNORE_LABEL)
    if (root / "labels.txt").is_file():
        return load_classes_txt(root / "labels.txt")
    raise ValueError(f"dataset labelme needs a class list: set prepare.classes, or put labels.txt "
                     f"(one label per line, as given to labelme --labels) in {root}")


def shape_region(shape: dict) -> Region:
    """One shape -> a region; ValueError for a malformed or non-region shape."""
    kind = shape.get("shape_type") or "polygon"
    pts = [(float(x), float(y)) for x, y in shape["points"]]
    if kind == "polygon":
        return Region(POLYGON, tuple(v for p in pts for v in p))
    if kind == "rectangle":
        if len(pts) != 2:
            raise ValueError(f"rectangle with {len(pts)} points, expected 2 corners")
        return Region(POLYGON, rectangle(*pts[0], *pts[1]))
    if kind == "circle":
        if len(pts) != 2:
            raise ValueError(f"circle with {len(pts)} points, expected centre and rim")
        (cx, cy), (x, y) = pts
        r = ((x - cx) ** 2 + (y - cy) ** 2) ** 0.5
        return Region(OUTLINE, ellipse(cx, cy, r, r))
    if kind == "mask":
        if len(pts) < 1 or not shape.get("mask"):
            raise ValueError("mask shape without its corner point or 'mask' PNG")
        return Region(MASK_PATCH, (pts[0][0], pts[0][1], shape["mask"]))
    raise ValueError(f"shape_type {kind!r} is not a region")


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    classes = class_names(root, cfg)
    listing = Listing(classes, [])
    index = {name: i for i, name in enumerate(classes)}
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
                raise ValueError("not a LabelMe file: no list 'shapes'")
        except (ValueError, UnicodeDecodeError) as exc:
            listing.problems.append({"file": str(path), "reasons": [f"unreadable LabelMe JSON: {exc}"]})
            continue
        listing.images.append(_record(root, path, data, index))
    if not listing.images and not listing.problems:
        raise FileNotFoundError(f"{root}: no LabelMe JSON files")
    return listing


def _record(root: Path, path: Path, data: dict, index: dict[str, int]) -> ImageRecord:
    rel = path.relative_to(root).as_posix()
    image = path.parent / str(data.get("imagePath") or "").replace("\\", "/")
    record = ImageRecord(rel=rel, image=image if data.get("imagePath") else None,
                         official=split_named(rel))
    if not image.is_file() and data.get("imageData"):
        try:
            record.embedded = base64.b64decode(data["imageData"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            record.problems.append(f"{path.name}: imageData is not base64")
    size = (data.get("imageHeight"), data.get("imageWidth"))
    record.size = size if all(isinstance(v, int) for v in size) else None
    groups: dict[tuple, InstanceSpec] = {}
    for i, shape in enumerate(data["shapes"]):
        label = str(shape.get("label", "")) if isinstance(shape, dict) else ""
        where = f"{path.name} shape {i} ({label})"
        try:
            region = shape_region(shape)
        except ValueError as exc:
            kind = shape.get("shape_type") if isinstance(shape, dict) else None
            target = record.instance_problems if kind in NOT_REGIONS else record.problems
            target.append(f"{where}: {exc}" + (": skipped" if kind in NOT_REGIONS else ""))
            continue
        except (KeyError, TypeError):
            record.problems.append(f"{where}: malformed shape (expected 'label' and 'points' [[x, y], ...])")
            continue
        if label == IGNORE_LABEL:
            record.ignore.append(region)
            continue
        if label not in index:
            record.problems.append(f"{where}: unknown label {label!r}; classes: {', '.join(index)}")
            continue
        group = shape.get("group_id")
        key = (label, group) if group is not None else ("#", i)
        if key not in groups:
            groups[key] = InstanceSpec(index[label], [], where if group is None else
                                       f"{path.name} group {group} ({label})")
            record.instances.append(groups[key])
        groups[key].regions.append(region)
    return record
