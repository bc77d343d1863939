"""What the stages show a person on the console.

- Training: one line per epoch, printed once by the driver (``EpochConsole``), from the
  records rank 0 writes to the run's progress file (``pipeline.engine.progress``); a tqdm bar over
  the epochs only when stderr is an interactive terminal.
- Ray's own logging (Core, Train, Data, in the driver and in every Ray process) at WARNING
  unless ``$SEG_RAY_LOG_LEVEL`` asks for another level (``ray_log_level``).

The formatting is pure (``epoch_line``, ``format_duration``), so tests check it without Ray.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from pipeline.config import paths

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_RAY_LOG_LEVEL = "WARNING"
# Ray Data reads this in each process it configures logging in (driver, workers, tasks).
ENV_RAY_DATA_LOG_LEVEL = "RAY_DATA_LOG_LEVEL"
ENV_RAY_AUTH_MODE = "RAY_AUTH_MODE"
ENV_PYTHONWARNINGS = "PYTHONWARNINGS"
# A warning filter (python -W syntax): Ray Train 2.60's dataset manager still passes
# ExecutionOptions.exclude_resources, which Ray Data deprecates.
RAY_INTERNAL_WARNINGS = "ignore:`ExecutionOptions.exclude_resources` is deprecated:DeprecationWarning"
# MLflow's "Downloading artifacts" bar, drawn with carriage returns even into a log file.
ENV_MLFLOW_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def ray_log_level(environ: Mapping[str, str] = os.environ) -> str:
    """The level of Ray's own console logging: ``$SEG_RAY_LOG_LEVEL`` (any case), else WARNING."""
    raw = environ.get(paths.ENV_RAY_LOG_LEVEL, "")
    level = raw.strip().upper()
    if not level:
        return DEFAULT_RAY_LOG_LEVEL
    if level not in LOG_LEVELS:
        raise ValueError(f"{paths.ENV_RAY_LOG_LEVEL}={raw!r} is not a log level; "
                         f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def ray_process_env(level: str) -> dict[str, str]:
    """Environment for Ray's processes that holds their library logging at ``level``
    (Ray Train's level travels in ``RunConfig.logging_config`` instead). Above INFO, the
    deprecation warning Ray Train's own dataset manager triggers in Ray Data is left out too:
    nothing a user of Ray can act on."""
    env = {ENV_RAY_DATA_LOG_LEVEL: level}
    if LOG_LEVELS.index(level) > LOG_LEVELS.index("INFO"):
        env[ENV_PYTHONWARNINGS] = RAY_INTERNAL_WARNINGS
    return env


def quiet_ray_train_worker(level: str) -> None:
    """In a Ray Train worker, hold at ``level`` the message it logs for every report (the whole
    ``TrainingReport``, 60+ metrics, from every rank). Ray names that logger after its file,
    outside ``ray.train``, so ``RunConfig.logging_config`` does not reach it."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def choose_ray_auth_mode(environ: dict[str, str] = os.environ) -> str:
    """``$RAY_AUTH_MODE`` for a local cluster this process is about to start: the caller's
    choice, else Ray's own default, token authentication (the token in ``~/.ray/auth_token``),
    chosen explicitly because Ray warns at every start when the variable is unset.

    Ray reads the variable into its configuration when imported, and ``ray.init`` re-reads it
    only when it sets the default itself; this re-reads it the same way, so the cluster's
    processes and this one agree on the mode.
    """
    if ENV_RAY_AUTH_MODE in environ:
        return environ[ENV_RAY_AUTH_MODE]
    from ray._raylet import Config

    environ[ENV_RAY_AUTH_MODE] = "token"
    Config.initialize("")
    return "token"


def interactive(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal a person watches (progress bars redraw there;
    in a log file or a pipe each redraw would be a new line)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def quiet_mlflow_progress(stream: TextIO = sys.stderr, environ: dict[str, str] = os.environ) -> None:
    """Turn MLflow's artifact progress bar off where ``stream`` is not a terminal (unless set)."""
    if not interactive(stream):
        environ.setdefault(ENV_MLFLOW_PROGRESS_BAR, "false")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: whole units, rounded down, for a person to read."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _field(record: Mapping[str, Any], key: str) -> Any:
    try:
        return record[key]
    except KeyError:
        raise ValueError(f"progress record has no {key!r}: {dict(record)}") from None


def _val_loss(value: float) -> str:
    """The validation loss, or nothing for a task that takes none (NaN)."""
    return "" if math.isnan(value) else f"  val loss {value:.4f}"


def epoch_line(record: Mapping[str, Any], elapsed_s: float, left_s: float | None = None) -> str:
    """One epoch for a person: ``record`` holds ``epoch`` (0-based), ``epochs``, ``train_loss``,
    ``val_loss``, ``val_score`` (labelled ``score_label``) and ``train_images_per_s`` (all workers together);
    ``elapsed_s`` is the time since training started, ``left_s`` an estimate of what is left."""
    line = (f"epoch {int(_field(record, 'epoch')) + 1}/{int(_field(record, 'epochs'))}"
            f"  train loss {_field(record, 'train_loss'):.4f}{_val_loss(_field(record, 'val_loss'))}"
            f"  val {_field(record, 'score_label')} {_field(record, 'val_score'):.4f}"
            f"  {_field(record, 'train_images_per_s'):.1f} img/s"
            f"  elapsed {format_duration(elapsed_s)}")
    if left_s is not None:
        line += f"  left ~{format_duration(left_s)}"
    return line


class EpochConsole:
    """Prints each epoch record as one line on ``out`` and, when ``bar_stream`` is a terminal,
    keeps a tqdm bar over the epochs below the lines.

    Time left is the mean time between the epochs seen here times the epochs to go (for the
    first epoch seen, that epoch's own training and validation seconds).
    """

    def __init__(self, epochs: int, out: TextIO | None = None, bar_stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.epochs, self.clock = epochs, clock
        self.out = out if out is not None else sys.stdout
        bar_stream = bar_stream if bar_stream is not None else sys.stderr
        self.start = clock()
        self.seen: list[tuple[int, float]] = []    # (epoch, clock) of each record shown
        self.bar = None
        if interactive(bar_stream):
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, desc="training", unit="epoch", file=bar_stream, leave=False)

    def show(self, record: Mapping[str, Any]) -> str:
        now = self.clock()
        # A time budget (train.max_minutes) re-plans the epochs after each one.
        self.epochs = int(record.get("epochs", self.epochs))
        if self.bar is not None:
            self.bar.total = self.epochs
        epoch = int(_field(record, "epoch"))
        self.seen.append((epoch, now))
        (first_epoch, first_t) = self.seen[0]
        if epoch > first_epoch:
            per_epoch = (now - first_t) / (epoch - first_epoch)
        else:   # the first epoch seen here: its own training and validation time
            per_epoch = float(record.get("train_seconds", math.nan)) + float(record.get("val_seconds", 0.0))
        line = epoch_line(record, now - self.start, per_epoch * (self.epochs - epoch - 1))
        if self.bar is not None:
            # Only this bar steps aside for the line (tqdm.write would redraw every bar of the
            # process, Ray Data's finished ones included).
            self.bar.clear()
            print(line, file=self.out, flush=True)
            self.bar.n = epoch + 1
            self.bar.refresh()
        else:
            print(line, file=self.out, flush=True)
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
