"""Stage ``prepare``: check the raw dataset and write the canonical prepared form.

``prepare.task: instance`` with an instance dataset (dsb2018, coco, labelme, via, yolo)
goes to ``pipeline.data.instance_prepare``, which writes instance shards in the same
layout and with the same checks and guarantees; ``prepare.task: panoptic`` (coco_panoptic,
ade20k, or a semantic dataset with ``prepare.thing_classes``) to
``pipeline.data.panoptic_prepare``, likewise; what follows is the semantic path.

Every image/mask pair is decoded and checked (unreadable image, missing mask, size
mismatch, labels outside the class list, binary masks saved as 0/255, the same image
in two splits). Strict mode fails with the whole list; lenient mode skips those files
and reports them. Output, written to a staging folder and renamed into place:

    <out>/{train,val,test}/part-NNNNN.parquet   encoded image + mask bytes (pipeline.data.shards)
    <out>/classes.json                           names, palette, ignore_index
    <out>/card.json, card.md                     counts, class frequencies and weights
    <out>/problems.json                          every problem and warning, by file

    python -m pipeline.prepare --receipt data/download.json --out data/prepared
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from functools import partial
from pathlib import Path

from pipeline.config import paths
from pipeline.config.params import (
    INSTANCE_DATASETS,
    PANOPTIC_DATASETS,
    PANOPTIC_TASK,
    PrepareParams,
    Resize,
    load_params,
)
from pipeline.data import fetch
from pipeline.data.card import class_statistics, render_markdown
from pipeline.data.checks import Inspection, convert_sample, inspect_sample, invalid_values
from pipeline.data.datasets import ClassSpec, Sample, class_spec, list_samples
from pipeline.data.instance_prepare import prepare_instances
from pipeline.data.panoptic_prepare import prepare_panoptic
from pipeline.data.problems import PrepareError, duplicate_problems, enforce, problem_report
from pipeline.data.problems import map_workers as _map
from pipeline.data.shards import shard_name, write_shard
from pipeline.data.sources import SOURCES
from pipeline.utils.io import read_json, write_json_atomic, write_text_atomic

log = logging.getLogger("pipeline.prepare")

INSTANCE_TASK = "instance"


def check_task(dataset: str, task: str) -> None:
    """An instance dataset needs ``task: instance``, and ``task: instance`` one of them; a
    panoptic dataset needs ``task: panoptic`` (which takes a semantic dataset too)."""
    if dataset in INSTANCE_DATASETS and task != INSTANCE_TASK:
        raise ValueError(
            f"download.dataset {dataset!r} holds instance annotations; prepare.task is {task!r}: "
            f"set prepare.task: {INSTANCE_TASK}")
    if dataset in PANOPTIC_DATASETS and task != PANOPTIC_TASK:
        raise ValueError(
            f"download.dataset {dataset!r} holds panoptic labels; prepare.task is {task!r}: "
            f"set prepare.task: {PANOPTIC_TASK}")
    if task == INSTANCE_TASK and dataset not in INSTANCE_DATASETS:
        raise ValueError(
            f"prepare.task {INSTANCE_TASK!r} needs an instance dataset (download.dataset one of "
            f"{', '.join(INSTANCE_DATASETS)}); download.dataset {dataset!r} has semantic masks")


def find_problems(
    inspections: list[Inspection], spec: ClassSpec
) -> tuple[dict[Sample, list[str]], list[dict], bool]:
    """Problems by sample, dataset-level warnings, and whether masks are 0/255 binary.

    Binary masks saved as 0/255 are recognised for the whole dataset at once: a
    two-class dataset in which no mask holds 1 but some hold 255. Deciding per file
    would misread an all-background mask whose only other pixels are ignore labels.
    """
    problems: dict[Sample, list[str]] = defaultdict(list)
    for ins in inspections:
        problems[ins.sample].extend(ins.problems)
    readable = [ins for ins in inspections if ins.hist is not None]
    binary_255 = (
        spec.num_classes == 2 and spec.ignore_index != 1
        and not any(ins.hist[1] for ins in readable)
        and any(ins.hist[255] for ins in readable)
        and all(not ins.hist[2:255].any() for ins in readable)
    )
    warnings = []
    if binary_255:
        warnings.append({
            "files": sum(1 for ins in readable if ins.hist[255]),
            "reason": "binary masks stored as 0/255: value 255 mapped to class 1 "
                      f"({spec.names[1]!r}); without this mapping the foreground IoU is 0",
        })
        for ins in readable:
            ins.hist[1], ins.hist[255] = ins.hist[255], 0
    for ins in readable:
        bad = invalid_values(ins.hist, spec)
        if bad:
            problems[ins.sample].append(
                f"label values {bad[:10]} outside classes 0..{spec.num_classes - 1} "
                f"(ignore label {spec.ignore_index}) in {ins.sample.mask}"
            )
    for sample, reasons in duplicate_problems(inspections).items():
        problems[sample].extend(reasons)
    return {s: p for s, p in problems.items() if p}, warnings, binary_255


def prepare(
    dataset: str, raw_root: Path, out: Path, cfg: PrepareParams, raw_digest: str = ""
) -> dict:
    """Check ``raw_root`` and write the prepared dataset to ``out``; returns the card."""
    check_task(dataset, cfg.task)
    if cfg.task == INSTANCE_TASK:
        return prepare_instances(dataset, raw_root, out, cfg, raw_digest)
    if cfg.task == PANOPTIC_TASK:
        return prepare_panoptic(dataset, raw_root, out, cfg, raw_digest)
    spec = class_spec(dataset, cfg)
    samples = list_samples(dataset, raw_root, cfg)
    log.info("%s: checking %d image/mask pairs with %d worker(s)", dataset, len(samples), cfg.workers)
    inspections = _map(partial(inspect_sample, spec=spec), samples, cfg.workers)
    problems, warnings, binary_255 = find_problems(inspections, spec)
    report = problem_report(problems)
    for w in warnings:
        log.warning("%s", w["reason"])
    enforce(report, cfg.strict)
    kept = [ins for ins in inspections if ins.sample not in problems]

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-staging-") as tmp:
        staging = Path(tmp) / out.name
        card = _write_prepared(dataset, kept, spec, cfg, binary_255, staging, raw_digest,
                               report, warnings)
        fetch.replace_dir(staging, out)
    return card


def convert_shard(
    task: tuple[list[Sample], Path], spec: ClassSpec, resizes: dict[str, Resize], binary_255: bool
) -> list[tuple[int, int]]:
    """Convert one shard's samples and write it; returns the (height, width) of each row.

    Runs in a worker process: the encoded bytes go straight to disk instead of
    through a pipe back to the parent.
    """
    samples, path = task
    rows = [convert_sample(s, spec, resizes[s.split], binary_255) for s in samples]
    write_shard(rows, path)
    return [(r["height"], r["width"]) for r in rows]


def _write_prepared(
    dataset: str, kept: list[Inspection], spec: ClassSpec, cfg: PrepareParams, binary_255: bool,
    staging: Path, raw_digest: str, report: list[dict], warnings: list[dict],
) -> dict:
    groups = {split: sorted((i for i in kept if i.sample.split == split), key=lambda i: i.sample.id)
              for split in paths.SPLITS}
    if not groups["train"]:
        raise PrepareError(f"{dataset}: no usable training images")
    tasks, task_split = [], []
    n = cfg.images_per_shard
    for split, group in groups.items():
        if not group:
            log.warning("split %s is empty", split)
        for k, start in enumerate(range(0, len(group), n)):
            tasks.append(([i.sample for i in group[start:start + n]], staging / split / shard_name(k)))
            task_split.append(split)
    resizes = {s: cfg.train_resize if s == "train" else cfg.eval_resize for s in paths.SPLITS}
    convert = partial(convert_shard, spec=spec, resizes=resizes, binary_255=binary_255)
    sizes_per_task = _map(convert, tasks, cfg.workers)
    splits = {}
    for split, group in groups.items():
        sizes = [hw for s, hws in zip(task_split, sizes_per_task, strict=True) if s == split for hw in hws]
        (staging / split).mkdir(parents=True, exist_ok=True)
        splits[split] = {
            "images": len(group),
            "shards": task_split.count(split),
            "min_size": "x".join(map(str, min(sizes))) if sizes else "-",
            "max_size": "x".join(map(str, max(sizes))) if sizes else "-",
            "statistics": class_statistics([ins.hist for ins in group], spec),
        }
        log.info("%s: %d images in %d shard(s)", split, len(group), task_split.count(split))
    source = SOURCES.get(dataset)
    card = {
        "dataset": dataset,
        "task": cfg.task,
        "source": {"homepage": source.homepage, "license": source.license,
                   "citation": source.citation} if source else {},
        "raw_tree_sha256": raw_digest,
        "classes": spec.to_json(),
        "splits": {s: {k: v for k, v in d.items() if k != "statistics"} for s, d in splits.items()},
        "statistics": {s: d["statistics"] for s, d in splits.items()},
        "train_statistics": splits["train"]["statistics"],
        "resize": {"train": cfg.train_resize.model_dump(mode="json"),
                   "eval": cfg.eval_resize.model_dump(mode="json")},
        "problems": {"errors": len(report), "warnings": len(warnings), "strict": cfg.strict},
        "format": "Parquet shards: id, image (PNG/JPEG bytes), mask (PNG, mode L, class "
                  "indices), height, width, image_format",
        "notes": [w["reason"] for w in warnings]
                 + ["Class frequencies are counted at native resolution before any resize."],
    }
    write_json_atomic(staging / paths.CLASSES_FILE, spec.to_json())
    write_json_atomic(staging / paths.CARD_JSON, card)
    write_text_atomic(staging / paths.CARD_MD, render_markdown(card))
    write_json_atomic(staging / paths.PROBLEMS_FILE, {"errors": report, "warnings": warnings})
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipt", type=Path, default=paths.DOWNLOAD_RECEIPT)
    parser.add_argument("--out", type=Path, default=paths.PREPARED_DIR)
    parser.add_argument("--params", type=Path, default=paths.PARAMS_FILE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg = load_params(PrepareParams, args.params)
    receipt = read_json(args.receipt)
    try:
        card = prepare(receipt["dataset"], Path(receipt["path"]), args.out, cfg,
                       receipt["tree_sha256"])
    except (PrepareError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"prepare: {exc}") from None
    counts = " / ".join(f"{s} {d['images']}" for s, d in card["splits"].items())
    log.info("prepared %s: %s images, %d classes + ignore %d -> %s", card["dataset"], counts,
             card["classes"]["num_classes"], card["classes"]["ignore_index"], args.out)


if __name__ == "__main__":
    main()
