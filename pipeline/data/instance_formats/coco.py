"""COCO instance JSON: ``images``, ``annotations`` (polygons, uncompressed or compressed
RLE, ``iscrowd``) and ``categories``; each image under its ``file_name`` relative to the
JSON file.

Which JSON: ``annotations.json`` at the folder's root, else the only ``*.json`` there, else
one JSON per split named by its file name (``instances_train2017.json``,
``instances_val2017.json``: their categories must agree). Classes: the categories in id
order; a category named ``_background_`` without annotations (LabelMe's export has one) is
not a class.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from pipeline.config.params import PrepareParams
from pipeline.data.instance_formats.common import (
    BACKGROUND_LABEL,
    POLYGON,
    RLE,
    ImageRecord,
    InstanceSpec,
    Listing,
    Region,
    split_named,
)


def annotation_files(root: Path) -> list[tuple[Path, str | None]]:
    """The JSON file(s) to read, each with the split its name gives (None: drawn by hash)."""
    if (root / "annotations.json").is_file():
        return [(root / "annotations.json", None)]
    found = sorted(root.glob("*.json"))
    if len(found) == 1:
        return [(found[0], None)]
    splits = [split_named(p.name) for p in found]
    if found and all(splits) and len(set(splits)) == len(splits):
        return list(zip(found, splits, strict=True))
    raise FileNotFoundError(
        f"{root}: expected annotations.json, a single *.json, or one JSON per split named "
        f"train/val/test; found {[p.name for p in found] or 'none'}")


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"not a COCO instance file: no list {', '.join(map(repr, missing))}")
    return data


def class_list(files: list[tuple[Path, dict]]) -> tuple[tuple[str, ...], dict[int, int]]:
    """(class names, category id -> class index) from the files' categories."""
    lists = {p: sorted((int(c["id"]), str(c["name"])) for c in d["categories"]) for p, d in files}
    first = next(iter(lists.values()))
    for path, cats in lists.items():
        if cats != first:
            raise ValueError(f"{path.name}: its categories differ from {files[0][0].name}'s")
    used = Counter(a.get("category_id") for _, d in files for a in d["annotations"])
    kept = [(cid, name) for cid, name in first if not (name == BACKGROUND_LABEL and not used[cid])]
    return tuple(n for _, n in kept), {cid: i for i, (cid, _) in enumerate(kept)}


def _regions(seg, where: str) -> list[Region]:
    if isinstance(seg, dict):
        return [Region(RLE, seg)]
    if isinstance(seg, list) and seg and all(isinstance(v, int | float) for v in seg):
        return [Region(POLYGON, tuple(seg))]        # a bare polygon, not wrapped in a list
    if isinstance(seg, list) and all(isinstance(p, list) for p in seg):
        return [Region(POLYGON, tuple(p)) for p in seg]
    raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict")


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    if cfg.classes is not None:
        raise ValueError("prepare.classes is not for dataset coco: the classes are the JSON's "
                         "categories; set prepare.classes to null")
    listing = Listing((), [])
    files = []
    for path, split in annotation_files(root):
        try:
            files.append((path, _load(path), split))
        except (ValueError, UnicodeDecodeError) as exc:
            listing.problems.append({"file": str(path), "reasons": [f"unreadable COCO JSON: {exc}"]})
    if not files:
        return listing
    classes, index = class_list([(p, d) for p, d, _ in files])
    listing.classes = classes
    for path, data, split in files:
        _read_file(root, path, data, split, index, listing)
    return listing


def _read_file(root: Path, path: Path, data: dict, split: str | None, index: dict[int, int],
               listing: Listing) -> None:
    records: dict[int, list[ImageRecord]] = defaultdict(list)
    for i, img in enumerate(data["images"]):
        try:
            image_id, name = img["id"], str(img["file_name"])
        except (KeyError, TypeError):
            listing.problems.append({"file": str(path), "reasons": [
                f"images[{i}]: no 'id' or 'file_name'"]})
            continue
        file = path.parent / name
        size = (img.get("height"), img.get("width"))
        record = ImageRecord(
            rel=(path.parent / name).relative_to(root).as_posix() if file.is_relative_to(root) else name,
            image=file,
            size=size if all(isinstance(v, int) for v in size) else None,
            official=split or split_named(name),
        )
        records[image_id].append(record)
        listing.images.append(record)
    for image_id, group in records.items():
        if len(group) > 1:
            for r in group:
                r.problems.append(f"{path.name}: duplicate image id {image_id} "
                                  f"({', '.join(o.rel for o in group)})")
    ann_ids = Counter(a.get("id") for a in data["annotations"] if isinstance(a, dict))
    for k, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotation id {ann.get('id', f'#{k}')}" if isinstance(ann, dict) else f"#{k}"
        group = records.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if not group:
            listing.problems.append({"file": str(path), "reasons": [
                f"{where}: image_id {ann.get('image_id') if isinstance(ann, dict) else None!r} "
                "is not an image of the file (label without image)"]})
            continue
        for record in group:
            _add_annotation(record, ann, where, index, ann_ids)


def _add_annotation(record: ImageRecord, ann: dict, where: str, index: dict[int, int],
                    ann_ids: Counter) -> None:
    if ann_ids[ann.get("id")] > 1:
        record.problems.append(f"{where}: duplicate annotation id")
    cls = index.get(ann.get("category_id"))
    if cls is None:
        record.problems.append(f"{where}: unknown category_id {ann.get('category_id')!r}")
        return
    seg = ann.get("segmentation")
    if seg in (None, [], {}):
        record.instance_problems.append(f"{where}: no segmentation (a box only): instance skipped")
        return
    try:
        regions = _regions(seg, where)
    except ValueError as exc:
        record.problems.append(str(exc))
        return
    record.instances.append(InstanceSpec(cls, regions, where, iscrowd=bool(ann.get("iscrowd", 0))))
