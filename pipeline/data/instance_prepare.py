"""``prepare`` for ``task: instance``: an annotation export (or DSB 2018) -> instance shards.

The format's importer (``pipeline.data.instance_formats``) lists the images and their
instances; workers rasterise and check every image (``common.inspect_image``); problems
are reported as for semantic data (strict: fail with the whole list, nothing written;
lenient: skip and report in problems.json, each entry saying whether the image or some of
its instances were left out); then workers write the shards (``shards.INSTANCE_SCHEMA``),
resized as ``prepare.train_resize`` / ``eval_resize`` say (images bilinear, masks
nearest, boxes recomputed from the resized masks). Output, in a staging folder renamed
into place:

    <out>/{train,val,test}/part-NNNNN.parquet   image bytes + instances (class, box, iscrowd, RLE)
    <out>/classes.json                           names, palette, ignore_index, num_classes, isthing
    <out>/card.json, card.md                     task, per-split image and instance counts
    <out>/problems.json                          every problem and warning, by file
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import PrepareParams, Resize
from pipeline.data import fetch
from pipeline.data.card import render_instance_markdown
from pipeline.data.checks import convert_image
from pipeline.data.datasets import voc_palette
from pipeline.data.instance_formats import list_dataset
from pipeline.data.instance_formats.common import (
    ImageRecord,
    Inspected,
    Listing,
    inspect_image,
    read_image_bytes,
)
from pipeline.data.problems import PrepareError, duplicate_problems, enforce, map_workers, problem_report
from pipeline.data.shards import INSTANCE_SCHEMA, shard_name, write_shard
from pipeline.data.sources import SOURCES
from pipeline.utils.io import write_json_atomic, write_text_atomic

log = logging.getLogger("pipeline.prepare")

FORMAT = ("Parquet shards: id, image (PNG/JPEG bytes), height, width, image_format, instances "
          "(class, box x0 y0 x1 y1, iscrowd, rle: compressed COCO RLE counts of height x width), "
          "ignore (RLE counts or null)")


def prepare_instances(dataset: str, raw_root: Path, out: Path, cfg: PrepareParams,
                      raw_digest: str = "") -> dict:
    """Check ``raw_root`` and write the prepared instance dataset to ``out``; returns the card."""
    listing = list_dataset(dataset, raw_root, cfg)
    log.info("%s: checking %d images with %d worker(s)", dataset, len(listing.images), cfg.workers)
    inspected = map_workers(inspect_image, listing.images, cfg.workers)
    report = build_report(inspected, listing)
    for w in listing.warnings:
        log.warning("%s", w["reason"])
    enforce(report, cfg.strict)
    skipped = {r["file"] for r in report if r.get("skipped") == "image"}
    kept = [(rec, ins) for rec, ins in zip(listing.images, inspected, strict=True)
            if str(ins.sample.image) not in skipped]
    if not listing.classes:
        raise PrepareError(f"{dataset}: no class list could be read (see the problems above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-staging-") as tmp:
        staging = Path(tmp) / out.name
        card = write_prepared(dataset, kept, listing, cfg, staging, raw_digest, report)
        fetch.replace_dir(staging, out)
    return card


def build_report(inspected: list[Inspected], listing: Listing) -> list[dict]:
    """problems.json's ``errors``: per image its reasons and what was skipped (the image,
    or only some instances), then the files that belong to no image."""
    reasons = {ins.sample: list(ins.problems) for ins in inspected if ins.problems}
    for sample, extra in duplicate_problems(inspected).items():
        reasons.setdefault(sample, []).extend(extra)
    image_level = set(reasons)
    for ins in inspected:
        if ins.dropped:
            reasons.setdefault(ins.sample, []).extend(ins.dropped)
    report = problem_report(reasons)
    for entry, sample in zip(report, sorted(reasons, key=lambda s: (s.split, s.id)), strict=True):
        entry["skipped"] = "image" if sample in image_level else "instances"
    files = sorted(listing.problems, key=lambda p: p["file"])
    return report + [{"file": p["file"], "split": None, "reasons": p["reasons"], "skipped": "file"}
                     for p in files]


def resize_rle(counts: bytes, size: tuple[int, int], out: tuple[int, int]) -> dict:
    """RLE counts of ``size`` (h, w) -> an RLE of ``out`` (h, w), nearest neighbour as for
    semantic masks (PIL's, which samples pixel centres)."""
    from pycocotools import mask as cocomask

    mask = cocomask.decode({"size": list(size), "counts": counts})
    small = Image.fromarray(mask * 255).resize((out[1], out[0]), Image.Resampling.NEAREST)
    return cocomask.encode(np.asfortranarray((np.asarray(small) > 0).astype(np.uint8)))


def convert_row(record: ImageRecord, ins: Inspected, resize: Resize) -> tuple[dict, int]:
    """One prepared row and the number of instances a downscale left without a pixel."""
    from pycocotools import mask as cocomask

    data, fmt, size, (oh, ow) = convert_image(read_image_bytes(record), resize)
    resized = size != (oh, ow)
    instances, vanished = [], 0
    for cls, crowd, counts in ins.instances:
        rle = resize_rle(counts, size, (oh, ow)) if resized else {"size": [oh, ow], "counts": counts}
        if resized and cocomask.area(rle) == 0:
            vanished += 1
            continue
        x, y, w, h = (float(v) for v in cocomask.toBbox(rle))
        instances.append({"class": cls, "box": [x, y, x + w, y + h], "iscrowd": crowd, "rle": rle["counts"]})
    ignore = ins.ignore
    if ignore is not None and resized:
        small = resize_rle(ignore, size, (oh, ow))
        ignore = small["counts"] if cocomask.area(small) else None
    row = {"id": ins.sample.id, "image": data, "height": oh, "width": ow, "image_format": fmt,
           "instances": instances, "ignore": ignore}
    return row, vanished


def convert_shard(task: tuple[list[tuple[ImageRecord, Inspected]], Path],
                  resizes: dict[str, Resize]) -> list[dict]:
    """Write one shard (in a worker process); returns per row what the card counts."""
    items, path = task
    rows, stats = [], []
    for record, ins in items:
        row, vanished = convert_row(record, ins, resizes[ins.sample.split])
        rows.append(row)
        stats.append({"size": (row["height"], row["width"]), "vanished": vanished,
                      "classes": [i["class"] for i in row["instances"] if not i["iscrowd"]],
                      "crowd": sum(i["iscrowd"] for i in row["instances"])})
    write_shard(rows, path, INSTANCE_SCHEMA)
    return stats


def classes_json(names: tuple[str, ...], cfg: PrepareParams) -> dict:
    # Colours skip VOC's black (index 0 there is the background, which instances do not have).
    given = cfg.palette if cfg.palette and len(cfg.palette) == len(names) else None
    palette = given or voc_palette(len(names) + 1)[1:]
    return {"names": list(names), "palette": [list(c) for c in palette], "ignore_index": cfg.ignore_index,
            "num_classes": len(names), "isthing": [True] * len(names)}


def write_prepared(dataset: str, kept: list[tuple[ImageRecord, Inspected]], listing: Listing,
                   cfg: PrepareParams, staging: Path, raw_digest: str, report: list[dict]) -> dict:
    groups = {s: sorted((k for k in kept if k[1].sample.split == s), key=lambda k: k[1].sample.id)
              for s in paths.SPLITS}
    if not groups["train"]:
        raise PrepareError(f"{dataset}: no usable training images")
    tasks, task_split = [], []
    n = cfg.images_per_shard
    for split, group in groups.items():
        if not group:
            log.warning("split %s is empty", split)
        (staging / split).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, len(group), n)):
            tasks.append((group[start:start + n], staging / split / shard_name(k)))
            task_split.append(split)
    resizes = {s: cfg.train_resize if s == "train" else cfg.eval_resize for s in paths.SPLITS}
    results = map_workers(partial(convert_shard, resizes=resizes), tasks, cfg.workers)
    names = listing.classes
    splits, statistics, vanished = {}, {}, 0
    for split in paths.SPLITS:
        rows = [r for s, stats in zip(task_split, results, strict=True) if s == split for r in stats]
        per_class = Counter(c for r in rows for c in r["classes"])
        with_class = Counter(c for r in rows for c in set(r["classes"]))
        sizes = [r["size"] for r in rows]
        vanished += sum(r["vanished"] for r in rows)
        splits[split] = {
            "images": len(rows),
            "instances": sum(len(r["classes"]) + r["crowd"] for r in rows),
            "crowd": sum(r["crowd"] for r in rows),
            "shards": task_split.count(split),
            "min_size": "x".join(map(str, min(sizes))) if sizes else "-",
            "max_size": "x".join(map(str, max(sizes))) if sizes else "-",
        }
        statistics[split] = {
            "instances": {name: per_class[i] for i, name in enumerate(names)},
            "images_with": {name: with_class[i] for i, name in enumerate(names)},
            "images_without_instances": sum(1 for r in rows if not r["classes"] and not r["crowd"]),
        }
        log.info("%s: %d images, %d instances in %d shard(s)", split, len(rows),
                 splits[split]["instances"], splits[split]["shards"])
    warnings = list(listing.warnings)
    if vanished:
        warnings.append({"files": vanished, "reason": f"{vanished} instance(s) had no pixel left after "
                                                      "the resize and were dropped"})
    classes = classes_json(names, cfg)
    source = SOURCES.get(dataset)
    card = {
        "dataset": dataset,
        "task": "instance",
        "source": {"homepage": source.homepage, "license": source.license,
                   "citation": source.citation} if source else {},
        "raw_tree_sha256": raw_digest,
        "classes": classes,
        "splits": splits,
        "statistics": statistics,
        "resize": {"train": cfg.train_resize.model_dump(mode="json"),
                   "eval": cfg.eval_resize.model_dump(mode="json")},
        "problems": {"errors": len(report), "warnings": len(warnings), "strict": cfg.strict},
        "format": FORMAT,
        "notes": [w["reason"] for w in warnings]
                 + ["Instance counts are after any resize; crowd regions are counted apart."],
    }
    write_json_atomic(staging / paths.CLASSES_FILE, classes)
    write_json_atomic(staging / paths.CARD_JSON, card)
    write_text_atomic(staging / paths.CARD_MD, render_instance_markdown(card))
    write_json_atomic(staging / paths.PROBLEMS_FILE, {"errors": report, "warnings": warnings})
    return card
