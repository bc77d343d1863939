"""YOLO segmentation labels (the Ultralytics layout): ``images/<sub>/<stem>.<ext>`` and
``labels/<sub>/<stem>.txt``, one line per instance: ``class x1 y1 x2 y2 ...``, a polygon in
0..1 of the image's width and height.

- An image without a label file has no objects: it is kept, with a warning.
- A label file without an image is a problem (nothing to train on).
- A line of 4 numbers after the class is a detection box, not a polygon: an instance problem.
- Classes: ``prepare.classes``, else ``names`` of a ``data.yaml`` (or any ``*.yaml``) at the
  folder's root (a list, or a dict by index), else ``classes.txt`` (one name per line).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config.params import PrepareParams
from pipeline.data.datasets import IMAGE_SUFFIXES
from pipeline.data.instance_formats.common import (
    POLYGON,
    ImageRecord,
    InstanceSpec,
    Listing,
    Region,
    load_classes_txt,
    split_named,
)


def class_names(root: Path, cfg: PrepareParams) -> tuple[str, ...]:
    if cfg.classes is not None:
        return tuple(cfg.classes)
    candidates = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    candidates.sort(key=lambda p: p.stem != "data")            # data.yaml first
    for path in candidates:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            return tuple(str(names[k]) for k in sorted(names, key=int))
        if isinstance(names, list):
            return tuple(str(n) for n in names)
    if (root / "classes.txt").is_file():
        return load_classes_txt(root / "classes.txt", drop=())
    raise ValueError(f"dataset yolo needs class names: set prepare.classes, or put a data.yaml with "
                     f"'names:' or a classes.txt (one name per line) in {root}")


def parse_line(line: str, num_classes: int) -> tuple[int, tuple[float, ...]]:
    """``class x1 y1 ...`` -> (class, coordinates); ValueError names what is wrong."""
    fields = line.split()
    try:
        cls = int(fields[0])
    except ValueError:
        raise ValueError(f"class {fields[0]!r} is not an integer") from None
    if not 0 <= cls < num_classes:
        raise ValueError(f"unknown class index {cls} (classes 0..{num_classes - 1})")
    try:
        coords = tuple(float(v) for v in fields[1:])
    except ValueError as exc:
        raise ValueError(f"coordinates: {exc}") from None
    return cls, coords


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    classes = class_names(root, cfg)
    listing = Listing(classes, [])
    images_root, labels_root = root / "images", root / "labels"
    labels = {p.relative_to(labels_root).with_suffix("").as_posix(): p
              for p in sorted(labels_root.rglob("*.txt"))}
    unlabelled = []
    seen = set()
    for image in sorted(images_root.rglob("*")):
        if not image.is_file() or image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
            continue
        key = image.relative_to(images_root).with_suffix("").as_posix()
        seen.add(key)
        rel = image.relative_to(root).as_posix()
        record = ImageRecord(rel=rel, image=image, normalised=True, official=split_named(rel))
        if key in labels:
            _read_labels(labels[key], record, len(classes))
        else:
            unlabelled.append(rel)
        listing.images.append(record)
    for key, path in labels.items():
        if key not in seen:
            listing.problems.append({"file": str(path), "reasons": [
                f"label file without an image (no images/{key}.* with an image suffix)"]})
    if unlabelled:
        listing.warnings.append({
            "files": len(unlabelled),
            "reason": f"{len(unlabelled)} image(s) without a label file, kept as images without "
                      f"objects: {', '.join(unlabelled[:10])}" + (" ..." if len(unlabelled) > 10 else ""),
        })
    if not listing.images and not listing.problems:
        raise FileNotFoundError(f"{images_root}: no image files")
    return listing


def _read_labels(path: Path, record: ImageRecord, num_classes: int) -> None:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        record.problems.append(f"{path.name}: unreadable label file: {exc}")
        return
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            cls, coords = parse_line(line, num_classes)
        except ValueError as exc:
            record.problems.append(f"{where}: {exc}")
            continue
        if len(coords) == 4:
            record.instance_problems.append(f"{where}: a detection box (4 numbers), not a polygon: skipped")
            continue
        record.instances.append(InstanceSpec(cls, [Region(POLYGON, coords)], f"{where} (class {cls})"))
