"""VGG Image Annotator exports: VIA 1.x ``via_region_data.json`` (the Mask R-CNN balloon
tutorial's files: a dict keyed by file name + file size) and VIA 2 project files (the same
records under ``_via_img_metadata``, attribute definitions under ``_via_attributes``).

Each record: ``filename`` (relative to the JSON file), ``regions`` (a list, or a dict keyed
"0", "1", ... in VIA 1.x), each with ``shape_attributes`` and ``region_attributes``.
Shapes: ``polygon`` and ``polyline`` (``all_points_x``/``all_points_y``; a polyline is closed
as Mask R-CNN's balloon loader does), ``rect`` (x, y, width, height), ``circle`` (cx, cy,
r), ``ellipse`` (cx, cy, rx, ry, theta in radians); ``point`` is not a region.

Classes: ``prepare.class_attribute`` names the region attribute that holds the class
(a text value, or a checkbox dict with one option ticked); its value ``__ignore__`` marks
an ignore region. The class list is ``prepare.classes``, else the attribute's options in a
VIA 2 project. With ``class_attribute: null`` every region is of one class, named by
``prepare.classes`` (one name) or ``object``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.data.instance_formats.common import (
    IGNORE_LABEL,
    OUTLINE,
    POLYGON,
    ImageRecord,
    InstanceSpec,
    Listing,
    Region,
    ellipse,
    rectangle,
    split_named,
)

DEFAULT_CLASS = "object"
NOT_REGIONS = {"point"}


def _records(data) -> tuple[dict, dict] | None:
    """(records by key, region attribute definitions) of a VIA file, None if it is not one."""
    if isinstance(data, dict) and isinstance(data.get("_via_img_metadata"), dict):
        attributes = (data.get("_via_attributes") or {}).get("region") or {}
        return data["_via_img_metadata"], attributes
    if isinstance(data, dict) and data and all(
            isinstance(v, dict) and "filename" in v and "regions" in v for v in data.values()):
        return data, {}
    return None


def class_names(files: list[tuple[Path, dict, dict]], cfg: PrepareParams) -> tuple[str, ...]:
    attr = cfg.class_attribute
    if attr is None:
        if cfg.classes is not None and len(cfg.classes) != 1:
            raise ValueError(f"dataset via with prepare.class_attribute null has one class; "
                             f"prepare.classes lists {len(cfg.classes)}: name the attribute that "
                             "holds the class in prepare.class_attribute")
        return tuple(cfg.classes or (DEFAULT_CLASS,))
    if cfg.classes is not None:
        return tuple(c for c in cfg.classes if c != IGNORE_LABEL)
    for _, _, attributes in files:
        options = (attributes.get(attr) or {}).get("options")
        if isinstance(options, dict) and options:
            return tuple(str(o) for o in options if o != IGNORE_LABEL)
    found = sorted({v for _, records, _ in files for rec in records.values()
                    for region in _regions(rec) for v in _values(region, attr)} - {IGNORE_LABEL})
    raise ValueError(f"dataset via: set prepare.classes to the values of region attribute "
                     f"{attr!r} in index order (no VIA 2 attribute options to read them from); "
                     f"found: {found}")


def _regions(rec: dict) -> list:
    regions = rec.get("regions") or []
    if isinstance(regions, dict):     # VIA 1.x: {"0": {...}, "1": {...}}
        return [regions[k] for k in sorted(regions, key=lambda k: (len(k), k))]
    return list(regions)


def _values(region, attr: str) -> list[str]:
    """The class names a region's attribute gives: a text value, or the ticked options."""
    value = (region.get("region_attributes") or {}).get(attr) if isinstance(region, dict) else None
    if isinstance(value, dict):
        return [str(k) for k, ticked in value.items() if ticked]
    return [str(value).strip()] if value not in (None, "") else []


def shape_region(shape: dict) -> Region:
    name = shape.get("name")
    if name in ("polygon", "polyline"):
        xs, ys = shape["all_points_x"], shape["all_points_y"]
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} all_points_x but {len(ys)} all_points_y")
        return Region(POLYGON, tuple(float(v) for p in zip(xs, ys, strict=True) for v in p))
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return Region(POLYGON, rectangle(x, y, x + w, y + h))
    if name == "circle":
        cx, cy, r = (float(shape[k]) for k in ("cx", "cy", "r"))
        return Region(OUTLINE, ellipse(cx, cy, r, r))
    if name == "ellipse":
        cx, cy, rx, ry = (float(shape[k]) for k in ("cx", "cy", "rx", "ry"))
        return Region(OUTLINE, ellipse(cx, cy, rx, ry, float(shape.get("theta", 0.0))))
    raise ValueError(f"shape {name!r} is not a region")


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    listing = Listing((), [])
    files = []
    for path in sorted(root.rglob("*.json")):
        try:
            found = _records(json.loads(path.read_text()))
            if found is None:
                raise ValueError("not a VIA file: neither _via_img_metadata nor records with "
                                 "'filename' and 'regions'")
        except (ValueError, UnicodeDecodeError) as exc:
            listing.problems.append({"file": str(path), "reasons": [f"unreadable VIA JSON: {exc}"]})
            continue
        files.append((path, *found))
    if not files and not listing.problems:
        raise FileNotFoundError(f"{root}: no VIA JSON files")
    listing.classes = class_names(files, cfg) if files else ()
    index = {name: i for i, name in enumerate(listing.classes)}
    for path, records, _ in files:
        for key, rec in records.items():
            listing.images.append(_record(root, path, key, rec, index, cfg.class_attribute))
    return listing


def _record(root: Path, path: Path, key: str, rec: dict, index: dict[str, int],
            attr: str | None) -> ImageRecord:
    name = str(rec.get("filename", ""))
    image = path.parent / name
    rel = image.relative_to(root).as_posix() if image.is_relative_to(root) else name
    record = ImageRecord(rel=rel, image=image, official=split_named(rel))
    for i, region in enumerate(_regions(rec)):
        where = f"{path.name} {key!r} region {i}"
        try:
            shape = region["shape_attributes"]
            geometry = shape_region(shape)
        except ValueError as exc:
            not_region = isinstance(shape, dict) and shape.get("name") in NOT_REGIONS
            (record.instance_problems if not_region else record.problems).append(
                f"{where}: {exc}" + (": skipped" if not_region else ""))
            continue
        except (KeyError, TypeError) as exc:
            record.problems.append(f"{where}: malformed shape_attributes (missing or bad {exc})")
            continue
        if attr is None:
            record.instances.append(InstanceSpec(0, [geometry], where))
            continue
        values = _values(region, attr)
        if len(values) != 1:
            record.problems.append(f"{where}: region attribute {attr!r} gives {values or 'no class'}; "
                                   "expected one class")
        elif values[0] == IGNORE_LABEL:
            record.ignore.append(geometry)
        elif values[0] not in index:
            record.problems.append(f"{where}: unknown class {values[0]!r}; classes: {', '.join(index)}")
        else:
            record.instances.append(InstanceSpec(index[values[0]], [geometry], f"{where} ({values[0]})"))
    return record
