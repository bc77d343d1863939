"""A training's progress journal: rank 0 appends one JSON line per epoch to
``<storage>/<run name>/progress.jsonl`` and the driver follows the file and prints each
record once (``pipeline.utils.console``).

The run's folder is where Ray Train persists checkpoints, which on a multi-node cluster it
must already be storage every node shares, so the journal reaches the driver wherever the
checkpoints do, and no worker ever prints.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# What the driver's epoch line needs from the worker's metrics (pipeline.utils.console.epoch_line).
RECORD_KEYS = ("epoch", "train_loss", "val_loss", "train_images_per_s", "train_seconds",
               "val_seconds", "is_best")


def epoch_record(metrics: Mapping[str, Any], epochs: int, score: str, label: str) -> dict[str, Any]:
    """The journal's record of one epoch: ``RECORD_KEYS`` from the reported metrics, ``epochs``,
    and the task's primary validation score (``val_score``, reported as ``score``; ``score_label``
    for people, e.g. mIoU)."""
    return {"epochs": epochs, **{key: metrics[key] for key in RECORD_KEYS}, "val_score": metrics[score],
            "score_label": label}


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line, written with a single write so a reader never sees
    half a record followed by another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class ProgressFollower:
    """Reads the records appended to ``path`` after it was created (what an earlier,
    interrupted invocation wrote is not shown again) and hands each to ``on_record``: by
    ``poll()``, or every ``interval_s`` in a thread while used as a context manager, with
    a last poll on exit. An error in a record is raised on exit."""

    def __init__(self, path: Path, on_record: Callable[[dict[str, Any]], Any], interval_s: float = 0.5):
        self.path, self.on_record, self.interval_s = Path(path), on_record, interval_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.line_no = self._count_lines() if self.offset else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _count_lines(self) -> int:
        with open(self.path, "rb") as f:
            return f.read(self.offset).count(b"\n")

    def poll(self) -> int:
        """Hand over every complete line appended since the last poll; returns how many."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1          # a line still being written waits for the next poll
        self.offset += end
        count = 0
        for raw in chunk[:end].splitlines():
            self.line_no += 1
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}:{self.line_no}: not a JSON progress record ({exc}): "
                                 f"{raw[:200]!r}") from None
            self.on_record(record)
            count += 1
        return count

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.poll()
        except BaseException as exc:   # handed to the caller on exit, not lost with the thread
            self._error = exc

    def __enter__(self) -> ProgressFollower:
        self._thread = threading.Thread(target=self._run, name="progress-follower", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is None and exc_type is None:
            self.poll()
        if self._error is not None and exc_type is None:
            raise self._error
