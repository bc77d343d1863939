"""``prepare`` for ``task: panoptic``: a COCO panoptic export, ADE20K, or a semantic dataset
with thing classes -> panoptic shards.

The format's importer (``pipeline.data.panoptic_formats``) lists the images, their label
files and how to read them; workers read and check every image (``common.inspect_image``);
problems are reported as for the other tasks (strict: fail with the whole list, nothing
written; lenient: skip and report in problems.json, each entry saying whether the image or
some of its segments were left out); then workers write the shards (``shards.PANOPTIC_SCHEMA``),
resized as ``prepare.train_resize`` / ``eval_resize`` say (images bilinear, segment ids
nearest; areas and boxes measured after the resize). Segment ids are renumbered 1..N in the
order of each segment's first pixel (row-major), so that one labelling gives one row
whatever format carried it. Output, in a staging folder renamed into place:

    <out>/{train,val,test}/part-NNNNN.parquet   image bytes + COCO panoptic PNG + segments
    <out>/classes.json                           names, palette, ignore_index, num_classes, isthing
    <out>/card.json, card.md                     task, per split images, segments, things, stuff
    <out>/problems.json                          every problem and warning, by file
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

from pipeline.config import paths
from pipeline.config.params import PrepareParams, Resize
from pipeline.data import fetch
from pipeline.data.card import render_panoptic_markdown
from pipeline.data.checks import convert_image
from pipeline.data.instance_prepare import build_report as instance_report
from pipeline.data.panoptic_formats import list_dataset
from pipeline.data.panoptic_formats.common import (
    Inspected,
    Listing,
    PanopticRecord,
    Reader,
    convert_labels,
    inspect_image,
)
from pipeline.data.problems import PrepareError, enforce, map_workers
from pipeline.data.shards import PANOPTIC_SCHEMA, shard_name, write_shard
from pipeline.data.sources import SOURCES
from pipeline.metrics.panoptic_types import encode_png
from pipeline.utils.io import write_json_atomic, write_text_atomic

log = logging.getLogger("pipeline.prepare")

TASK = "panoptic"
SEGMENTS = "segments"      # problems.json: only some segments of the image were left out
FORMAT = ("Parquet shards: id, image (PNG/JPEG bytes), height, width, image_format, panoptic (COCO "
          "panoptic PNG: segment id R + 256 G + 256^2 B, 0 = void, ids 1..N by first pixel in row-major "
          "order), segments (id, class, iscrowd, area, box x0 y0 x1 y1)")


def prepare_panoptic(dataset: str, raw_root: Path, out: Path, cfg: PrepareParams,
                     raw_digest: str = "") -> dict:
    """Check ``raw_root`` and write the prepared panoptic dataset to ``out``; returns the card."""
    listing = list_dataset(dataset, raw_root, cfg)
    log.info("%s: checking %d images with %d worker(s)", dataset, len(listing.images), cfg.workers)
    inspected = map_workers(partial(inspect_image, reader=listing.reader), listing.images, cfg.workers)
    report = build_report(inspected, listing)
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
    """problems.json's ``errors``, as for instance datasets: per image its reasons and what was
    skipped (the image, or only ``segments`` listed without a pixel), then the files that
    belong to no image."""
    report = instance_report(inspected, listing)
    for entry in report:
        entry["skipped"] = SEGMENTS if entry["skipped"] == "instances" else entry["skipped"]
    return report


def convert_row(record: PanopticRecord, reader: Reader, resize: Resize) -> tuple[dict, dict]:
    """One prepared row, and the segments a downscale left without a pixel (``vanished``) and
    the fragments made void (``voided``)."""
    data, fmt, _, (oh, ow) = convert_image(record.image.read_bytes(), resize)
    labels = reader(record)
    ids, segments, vanished = convert_labels(labels, (oh, ow))
    row = {"id": record.id, "image": data, "height": oh, "width": ow, "image_format": fmt,
           "panoptic": encode_png(ids), "segments": segments}
    return row, {"vanished": vanished, "voided": labels.voided}


def convert_shard(task: tuple[list[PanopticRecord], Path], reader: Reader,
                  resizes: dict[str, Resize]) -> list[dict]:
    """Write one shard (in a worker process); returns per row what the card counts."""
    records, path = task
    rows, stats = [], []
    for record in records:
        row, lost = convert_row(record, reader, resizes[record.split])
        rows.append(row)
        stats.append({"size": (row["height"], row["width"]), **lost,
                      "segments": [(s["class"], s["iscrowd"]) for s in row["segments"]]})
    write_shard(rows, path, PANOPTIC_SCHEMA)
    return stats


def classes_json(listing: Listing) -> dict:
    return {"names": list(listing.classes), "palette": [list(c) for c in listing.palette],
            "ignore_index": listing.ignore_index, "num_classes": len(listing.classes),
            "isthing": list(listing.isthing)}


def split_counts(rows: list[dict], listing: Listing) -> tuple[dict, dict]:
    """(the card's counts of one split, its per-class statistics): crowd regions apart."""
    isthing = listing.isthing
    segments = [s for r in rows for s in r["segments"]]
    per_class = Counter(c for c, crowd in segments if not crowd)
    with_class = Counter(c for r in rows for c in {c for c, crowd in r["segments"] if not crowd})
    sizes = [r["size"] for r in rows]
    counts = {
        "images": len(rows),
        "segments": len(segments),
        "things": sum(1 for c, crowd in segments if isthing[c] and not crowd),
        "stuff": sum(1 for c, crowd in segments if not isthing[c] and not crowd),
        "crowd": sum(1 for _, crowd in segments if crowd),
        "voided_fragments": sum(r["voided"] for r in rows),
        "min_size": "x".join(map(str, min(sizes))) if sizes else "-",
        "max_size": "x".join(map(str, max(sizes))) if sizes else "-",
    }
    statistics = {"segments": {n: per_class[i] for i, n in enumerate(listing.classes)},
                  "images_with": {n: with_class[i] for i, n in enumerate(listing.classes)},
                  "images_without_segments": sum(1 for r in rows if not r["segments"])}
    return counts, statistics


def write_prepared(dataset: str, kept: list[tuple[PanopticRecord, Inspected]], listing: Listing,
                   cfg: PrepareParams, staging: Path, raw_digest: str, report: list[dict]) -> dict:
    groups = {s: sorted((rec for rec, _ in kept if rec.split == s), key=lambda r: r.id) for s in paths.SPLITS}
    if not groups["train"]:
        raise PrepareError(f"{dataset}: no usable training images")
    tasks, task_split = [], []
    for split, group in groups.items():
        if not group:
            log.warning("split %s is empty", split)
        (staging / split).mkdir(parents=True, exist_ok=True)
        for k, start in enumerate(range(0, len(group), cfg.images_per_shard)):
            tasks.append((group[start:start + cfg.images_per_shard], staging / split / shard_name(k)))
            task_split.append(split)
    resizes = {s: cfg.train_resize if s == "train" else cfg.eval_resize for s in paths.SPLITS}
    results = map_workers(partial(convert_shard, reader=listing.reader, resizes=resizes), tasks, cfg.workers)
    splits, statistics, vanished = {}, {}, 0
    for split in paths.SPLITS:
        rows = [r for s, stats in zip(task_split, results, strict=True) if s == split for r in stats]
        vanished += sum(r["vanished"] for r in rows)
        splits[split], statistics[split] = split_counts(rows, listing)
        splits[split]["shards"] = task_split.count(split)
        log.info("%s: %d images, %d segments (%d things, %d stuff) in %d shard(s)", split, len(rows),
                 splits[split]["segments"], splits[split]["things"], splits[split]["stuff"],
                 splits[split]["shards"])
    warnings = list(listing.warnings)
    if vanished:
        warnings.append({"files": vanished, "reason": f"{vanished} segment(s) had no pixel left after "
                                                      "the resize and were dropped"})
    classes = classes_json(listing)
    source = SOURCES.get(dataset)
    card = {
        "dataset": dataset,
        "task": TASK,
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
        "notes": [w["reason"] for w in warnings] + listing.notes
                 + ["Segment counts are after any resize; things and stuff leave crowd regions out."],
    }
    write_json_atomic(staging / paths.CLASSES_FILE, classes)
    write_json_atomic(staging / paths.CARD_JSON, card)
    write_text_atomic(staging / paths.CARD_MD, render_panoptic_markdown(card))
    write_json_atomic(staging / paths.PROBLEMS_FILE, {"errors": report, "warnings": warnings})
    return card
