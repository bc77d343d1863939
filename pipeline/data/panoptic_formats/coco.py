"""COCO panoptic exports: a JSON file (``images``, ``categories`` with ``isthing``, and for
the RGB format ``annotations``) with a folder of PNGs beside it.

``prepare.panoptic_format`` says which PNGs:
- ``rgb`` (COCO's own): the folder named as the JSON (``panoptic_val2017.json`` +
  ``panoptic_val2017/``); each annotation names its PNG (``file_name``), whose pixels hold a
  segment id ``R + 256 G + 256^2 B`` (0 = void), and lists the segments in ``segments_info``
  (``id``, ``category_id``, ``iscrowd``; ``bbox`` and ``area`` are measured again);
- ``two_channel`` (the panoptic paper's format): the folder named as the JSON plus
  ``_2ch_format`` (panopticapi's name for it); each image's PNG, named as the image with
  ``.png``, holds the category id in R (0 = void) and the instance in G (stuff: 0; 255 marks a
  crowd region of a thing class, as panopticapi's 2-channel samples write them). The JSON's
  ``annotations``, if any, are not read.

Every ``*.json`` below ``download.folder`` that has such a folder beside it is read (several:
one per split, named train/val/test, or all split by hash); other JSON files (instance
annotations, a categories file) are left alone. Images are found by ``file_name`` below
``download.folder`` (COCO keeps them in ``val2017/`` beside ``annotations/``): the one file
whose path ends with it; none is a missing image, two are an ambiguity. Classes: the
categories in id order (the JSON files must agree), colours from their ``color``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path, PurePosixPath

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
    stuff_with_instances,
)
from pipeline.metrics.panoptic_types import rgb_to_ids

RGB = "rgb"
TWO_CHANNEL = "two_channel"
PNG_FOLDER_SUFFIX = {RGB: "", TWO_CHANNEL: "_2ch_format"}
VOID_CATEGORY = 0          # two_channel: R = 0 is void
CROWD_INSTANCE = 255       # two_channel: G = 255 on a thing class is a crowd region


def export_files(root: Path, fmt: str) -> list[tuple[Path, Path]]:
    """(JSON, PNG folder) pairs: every JSON below ``root`` with its PNG folder beside it."""
    suffix = PNG_FOLDER_SUFFIX[fmt]
    seen = sorted(root.rglob("*.json"))
    found = [(p, p.with_name(p.stem + suffix)) for p in seen if p.with_name(p.stem + suffix).is_dir()]
    if not found:
        raise FileNotFoundError(
            f"{root}: no COCO panoptic export for prepare.panoptic_format {fmt!r}: expected a JSON "
            f"file with a folder of PNGs named as it{' plus ' + suffix if suffix else ''} beside it "
            f"(panoptic_val2017.json + panoptic_val2017{suffix}/); JSON files here: "
            f"{[p.relative_to(root).as_posix() for p in seen] or 'none'}")
    return found


def _load(path: Path, fmt: str) -> dict:
    data = json.loads(path.read_text())
    need = ("images", "categories") + (("annotations",) if fmt == RGB else ())
    missing = [k for k in need if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"not a COCO panoptic file: no list {', '.join(map(repr, missing))}")
    return data


def class_list(files: list[tuple[Path, dict]]) -> tuple[tuple, tuple, tuple, dict[int, int]]:
    """(names, isthing, palette, category id -> class index) from the files' categories."""
    tables = {}
    for path, data in files:
        try:
            tables[path] = sorted((int(c["id"]), str(c["name"]), bool(c["isthing"]),
                                   tuple(int(v) for v in c["color"]) if c.get("color") else None)
                                  for c in data["categories"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path.name}: every category needs id, name and isthing ({exc!r})") from None
    first_path, first = next(iter(tables.items()))
    for path, cats in tables.items():
        if cats != first:
            raise ValueError(f"{path.name}: its categories differ from {first_path.name}'s")
    if not first:
        raise ValueError(f"{first_path.name}: no categories")
    colours = [c[3] for c in first]
    palette = tuple(colours) if all(colours) else voc_palette(len(first) + 1)[1:]
    return (tuple(c[1] for c in first), tuple(c[2] for c in first), palette,
            {c[0]: i for i, c in enumerate(first)})


def image_index(root: Path, skip: list[Path]) -> dict[str, list[Path]]:
    """Image files below ``root`` (outside the PNG folders ``skip``) by file name."""
    index = defaultdict(list)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(p.is_relative_to(s) for s in skip):
            index[p.name].append(p)
    return index


def find_image(file_name: str, index: dict[str, list[Path]], root: Path) -> tuple[Path | None, str | None]:
    """(the one image whose path ends with ``file_name``, None), (None, None) when there is
    none (a missing image) or (None, the ambiguity) when there are several."""
    tail = PurePosixPath(file_name).parts
    hits = [p for p in index.get(PurePosixPath(file_name).name, [])
            if p.relative_to(root).parts[-len(tail):] == tail]
    if len(hits) > 1:
        where = ", ".join(p.relative_to(root).as_posix() for p in hits)
        return None, f"image file_name {file_name} is ambiguous: {where}"
    return (hits[0] if hits else None), None


def list_images(root: Path, cfg: PrepareParams) -> Listing:
    if cfg.thing_classes is not None or cfg.classes is not None:
        raise ValueError("prepare.thing_classes and prepare.classes are not for dataset coco_panoptic: "
                         "the classes and isthing are the JSON's categories; set them to null")
    fmt = cfg.panoptic_format
    pairs = export_files(root, fmt)
    problems, files = [], []
    for path, folder in pairs:
        try:
            files.append((path, folder, _load(path, fmt)))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append({"file": str(path), "reasons": [f"unreadable COCO panoptic JSON: {exc}"]})
    if not files:
        return Listing((), (), (), cfg.ignore_index, _no_reader, [], problems)
    names, isthing, palette, index = class_list([(p, d) for p, _, d in files])
    if cfg.ignore_index < len(names):
        raise ValueError(f"prepare.ignore_index {cfg.ignore_index} collides with class "
                         f"{names[cfg.ignore_index]!r} of {len(names)}; use a value >= {len(names)}")
    read = read_rgb if fmt == RGB else read_two_channel
    listing = Listing(names, isthing, palette, cfg.ignore_index,
                      partial(read, index=index, isthing=isthing, names=names), [], problems)
    if fmt == TWO_CHANNEL:
        listing.notes.append(f"2-channel PNGs: G = {CROWD_INSTANCE} on a thing class read as a crowd region.")
    images = image_index(root, [f for _, f in pairs] + [p.with_name(p.stem + s) for p, _ in pairs
                                                        for s in PNG_FOLDER_SUFFIX.values()])
    for path, folder, data in files:
        _read_file(root, path, folder, data, fmt, images, listing)
    return listing


def _no_reader(record: PanopticRecord) -> Labels:
    raise AssertionError("no class list: prepare stops before reading labels")


def _read_file(root: Path, path: Path, folder: Path, data: dict, fmt: str,
               images: dict[str, list[Path]], listing: Listing) -> None:
    by_id: dict[object, list[PanopticRecord]] = defaultdict(list)
    official = split_named(path.name)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            listing.problems.append({"file": str(path), "reasons": [f"images[{i}]: no 'id' or 'file_name'"]})
            continue
        name = str(img["file_name"])
        file, problem = find_image(name, images, root)
        # The id comes from file_name, not from where the image was found (or not found).
        record = PanopticRecord(rel=file.relative_to(root).as_posix() if file else name, image=file,
                                label=None, official=official or split_named(name),
                                id=PurePosixPath(name).with_suffix("").as_posix().replace("/", "__"))
        if problem:
            record.problems.append(problem)
        if fmt == TWO_CHANNEL:
            record.label = folder / (PurePosixPath(name).stem + ".png")
        by_id[img["id"]].append(record)
        listing.images.append(record)
    for image_id, group in by_id.items():
        if len(group) > 1:
            for r in group:
                others = ", ".join(o.rel for o in group)
                r.problems.append(f"{path.name}: duplicate image id {image_id} ({others})")
    named = {r.label.name for g in by_id.values() for r in g if r.label is not None}
    if fmt == RGB:
        named = _annotations(path, folder, data, by_id, listing)
    for png in sorted(folder.glob("*.png")):
        if png.name not in named:
            listing.problems.append({"file": str(png), "reasons": [
                f"label without image: no image of {path.name} has this PNG"]})


def _annotations(path: Path, folder: Path, data: dict, by_id: dict, listing: Listing) -> set[str]:
    """Attach each annotation's PNG and segments_info to its image; returns the PNG names used."""
    named, seen = set(), Counter()
    for k, ann in enumerate(data["annotations"]):
        group = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        png = str(ann.get("file_name", "")) if isinstance(ann, dict) else ""
        if not group:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            listing.problems.append({"file": str(folder / png) if png else str(path), "reasons": [
                f"{path.name} annotations[{k}]: image_id {image_id!r} is not an image of the file "
                "(label without image)"]})
            continue
        named.add(png)
        seen[ann["image_id"]] += 1
        info = ann.get("segments_info")
        where = f"{path.name} annotations[{k}] (image id {ann['image_id']})"
        for record in group:
            if seen[ann["image_id"]] > 1:
                record.problems.append(f"{where}: a second annotation of one image")
            if not png or not isinstance(info, list):
                record.problems.append(f"{where}: needs file_name and a segments_info list")
                continue
            record.label, record.info = folder / png, info
    for image_id, group in by_id.items():
        if not seen[image_id]:
            for record in group:
                record.problems.append(f"missing label: no annotation of image id {image_id} in {path.name}")
    return named


def read_rgb(record: PanopticRecord, index: dict[int, int], isthing: tuple[bool, ...],
             names: tuple[str, ...]) -> Labels:
    """COCO's RGB PNG + segments_info -> ``Labels`` keyed by the PNG's segment ids."""
    name = record.label.name if record.label else "label"
    rgb = rgb_channels(read_label_png(record.label), record.label, "a COCO panoptic PNG")
    keys = rgb_to_ids(rgb).astype(np.int64)
    present, counts = np.unique(keys, return_counts=True)
    pixels = dict(zip(present.tolist(), counts.tolist(), strict=True))
    listed = Counter(s.get("id") if isinstance(s, dict) else None for s in record.info)
    labels, twice = Labels(keys, {}), set()
    for k, seg in enumerate(record.info):
        sid = seg.get("id") if isinstance(seg, dict) else None
        where = f"{name} segment id {sid}"
        if not isinstance(sid, int) or isinstance(sid, bool) or sid <= 0:
            labels.problems.append(f"{name} segments_info[{k}]: id {sid!r} is not a positive integer")
            continue
        if listed[sid] > 1:
            if sid not in twice:
                twice.add(sid)
                labels.problems.append(f"{where}: listed {listed[sid]} times in segments_info "
                                       "(overlapping segments)")
            continue
        cls = index.get(seg.get("category_id"))
        if cls is None:
            labels.problems.append(f"{where}: category_id {seg.get('category_id')!r} is not a category")
            continue
        if sid not in pixels:
            labels.dropped.append(f"{where} ({names[cls]}): listed in segments_info but has no pixel "
                                  "(an empty segment: left out, the image kept)")
            continue
        labels.segments[sid] = (cls, bool(seg.get("iscrowd", 0)))
    for sid in present.tolist():
        if sid and sid not in listed:
            labels.problems.append(f"{name} segment id {sid} (RGB {sid % 256}, {sid // 256 % 256}, "
                                   f"{sid // 65536}; {pixels[sid]} pixels) is not in segments_info")
    labels.problems += stuff_with_instances(labels.segments, isthing, names, name)
    return labels


def read_two_channel(record: PanopticRecord, index: dict[int, int], isthing: tuple[bool, ...],
                     names: tuple[str, ...]) -> Labels:
    """A 2-channel PNG (R category id, G instance) -> ``Labels`` keyed by category * 256 + instance."""
    name = record.label.name if record.label else "label"
    pixels = rgb_channels(read_label_png(record.label), record.label, "a 2-channel panoptic PNG")
    category, instance = pixels[..., 0], pixels[..., 1]
    keys = np.where(category == VOID_CATEGORY, 0, category * 256 + instance)
    labels = Labels(keys, {})
    present, counts = np.unique(keys, return_counts=True)
    for key, n in zip(present.tolist(), counts.tolist(), strict=True):
        if not key:
            continue
        cat, inst = divmod(key, 256)
        cls = index.get(cat)
        where = f"{name} segment (category {cat}, instance {inst})"
        if cls is None:
            labels.problems.append(f"{where}: category id {cat} in R ({n} pixels) is not in the categories")
        elif not isthing[cls] and inst:
            labels.problems.append(f"{where}: stuff class {names[cls]!r} with instance id {inst} in G "
                                   "(stuff has instance 0: an instance id on a stuff class is an error)")
        else:
            labels.segments[key] = (cls, isthing[cls] and inst == CROWD_INSTANCE)
    return labels
