"""What both prepare paths (semantic and instance) share: the worker pool, the check that
finds one image in two splits, and the problem report that strict mode raises and lenient
mode logs."""

from __future__ import annotations

import logging
import multiprocessing
from collections import defaultdict
from collections.abc import Callable, Iterable

from pipeline.config.paths import SPLITS
from pipeline.data.datasets import Sample

log = logging.getLogger("pipeline.prepare")

SPLIT_PRIORITY = {s: i for i, s in enumerate(SPLITS)}  # a duplicate stays in train


class PrepareError(RuntimeError):
    """Problems found in strict mode; the message lists every one."""


def map_workers(fn: Callable, items: Iterable, workers: int) -> list:
    """``[fn(item) for item in items]`` over ``workers`` forked processes, in order."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(fn, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


def duplicate_problems(inspections: Iterable) -> dict[Sample, list[str]]:
    """The same image bytes (``.image_sha1``) in two splits: a problem for every copy but
    the one in the earliest split (train, then val, then test)."""
    by_hash = defaultdict(list)
    for ins in inspections:
        if ins.image_sha1:
            by_hash[ins.image_sha1].append(ins.sample)
    problems: dict[Sample, list[str]] = defaultdict(list)
    for group in by_hash.values():
        if len({s.split for s in group}) > 1:
            keep = min(group, key=lambda s: SPLIT_PRIORITY[s.split])
            for s in group:
                if s.split != keep.split:
                    problems[s].append(f"same image as {keep.image} ({keep.split}) also in split {s.split}")
    return problems


def problem_report(problems: dict[Sample, list[str]]) -> list[dict]:
    """``problems.json``'s ``errors``: one entry per file, in split and id order."""
    return [{"file": str(s.image), "split": s.split, "reasons": reasons}
            for s, reasons in sorted(problems.items(), key=lambda kv: (kv[0].split, kv[0].id))]


def enforce(report: list[dict], strict: bool) -> None:
    """Strict: raise ``PrepareError`` listing every entry. Lenient: log each (an entry's
    ``skipped`` says what was left out: ``instances`` of an image, else the whole file)."""
    if report and strict:
        listing = "\n".join(f"  {r['file']}: {'; '.join(r['reasons'])}" for r in report)
        raise PrepareError(
            f"{len(report)} file(s) failed the checks (prepare.strict is true; set it to "
            f"false to skip them and continue):\n{listing}"
        )
    for r in report:
        what = "dropped instances of" if r.get("skipped") == "instances" else "skipped"
        log.warning("%s %s: %s", what, r["file"], "; ".join(r["reasons"]))
