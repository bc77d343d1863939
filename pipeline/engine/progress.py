"""A training's progress journal: rank 0 writes one JSON record per epoch into
``<run folder>/progress/`` and the driver follows the folder and prints each record once
(``pipeline.utils.console``).

The run's folder is where Ray Train persists checkpoints (``pipeline.artifacts.storage``: the
repository's ``ray_results/`` or the shared storage of a cluster, an object store included), so
the journal reaches the driver wherever the checkpoints do, and no worker ever prints. A record is
a file of its own, written whole (an object store cannot append): ``<epoch>-<random>.json``, in
epoch order by name.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.artifacts.storage import Location

# What the driver's epoch line needs from the worker's metrics (pipeline.utils.console.epoch_line).
RECORD_KEYS = ("epoch", "train_loss", "val_loss", "train_images_per_s", "train_seconds",
               "val_seconds", "is_best")


def epoch_record(metrics: Mapping[str, Any], epochs: int, score: str, label: str) -> dict[str, Any]:
    """The journal's record of one epoch: ``RECORD_KEYS`` from the reported metrics, ``epochs``,
    and the task's primary validation score (``val_score``, reported as ``score``; ``score_label``
    for people, e.g. mIoU)."""
    return {"epochs": epochs, **{key: metrics[key] for key in RECORD_KEYS}, "val_score": metrics[score],
            "score_label": label}


def append_record(folder: Location, record: Mapping[str, Any]) -> None:
    """Add ``record`` to the journal ``folder`` as a file of its own, written whole."""
    epoch = int(record.get("epoch", 0))
    folder.child(f"{epoch:06d}-{uuid.uuid4().hex[:8]}.json").write_text(json.dumps(record))


def record_names(folder: Location) -> list[str]:
    """The journal's records, in order (a temporary file being written is not one)."""
    return [n for n in folder.files() if n.endswith(".json") and not n.startswith(".")]


class ProgressFollower:
    """Reads the records added to the journal ``folder`` after it was created (what an earlier,
    interrupted invocation wrote is not shown again) and hands each to ``on_record``: by
    ``poll()``, or every ``interval_s`` in a thread while used as a context manager, with a last
    poll on exit. An error in a record is raised on exit."""

    def __init__(self, folder: Location, on_record: Callable[[dict[str, Any]], Any], interval_s: float = 0.5):
        self.folder, self.on_record, self.interval_s = folder, on_record, interval_s
        self.seen = set(record_names(folder))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def poll(self) -> int:
        """Hand over every record added since the last poll, in order; returns how many."""
        count = 0
        for name in record_names(self.folder):
            if name in self.seen:
                continue
            file = self.folder.child(name)
            raw = file.read_bytes()
            self.seen.add(name)
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file.uri()}: not a JSON progress record ({exc}): {raw[:200]!r}") from None
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
