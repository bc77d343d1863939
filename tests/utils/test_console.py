"""The console's formatting and policy (pipeline/utils/console.py), without Ray."""

import io
import logging
import math
import os
import subprocess
import sys

import pytest

from pipeline.utils import console

RECORD = {"epoch": 2, "epochs": 10, "train_loss": 0.86887, "val_loss": 1.28744, "val_score": 0.14012,
          "score_label": "mIoU",
          "train_images_per_s": 9.638, "train_seconds": 50.0, "val_seconds": 10.0, "is_best": 1.0}


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (9.9, "9s"), (59.99, "59s"), (60, "1m00s"), (185, "3m05s"), (3599, "59m59s"),
    (3600, "1h00m"), (3720 + 59, "1h02m"), (math.nan, "?"), (-1, "?"), (math.inf, "?"),
])
def test_durations_read_as_whole_units(seconds, text):
    assert console.format_duration(seconds) == text


def test_epoch_line_is_one_line_with_every_field():
    line = console.epoch_line(RECORD, elapsed_s=252, left_s=580)
    assert line == ("epoch 3/10  train loss 0.8689  val loss 1.2874  val mIoU 0.1401  9.6 img/s"
                    "  elapsed 4m12s  left ~9m40s")
    assert "\n" not in line and len(line) < 120
    assert "left" not in console.epoch_line(RECORD, elapsed_s=1)


def test_a_record_without_a_field_names_it():
    with pytest.raises(ValueError, match="'val_score'"):
        console.epoch_line({k: v for k, v in RECORD.items() if k != "val_score"}, 1.0)


def test_ray_log_level_defaults_to_warning_and_names_the_variable_when_wrong():
    assert console.ray_log_level({}) == "WARNING"
    assert console.ray_log_level({"SEG_RAY_LOG_LEVEL": " info "}) == "INFO"
    assert console.ray_log_level({"SEG_RAY_LOG_LEVEL": ""}) == "WARNING"
    with pytest.raises(ValueError, match=r"SEG_RAY_LOG_LEVEL='loud'.*DEBUG, INFO, WARNING"):
        console.ray_log_level({"SEG_RAY_LOG_LEVEL": "loud"})
    assert console.ray_process_env("INFO") == {"RAY_DATA_LOG_LEVEL": "INFO"}
    assert console.ray_process_env("ERROR")["RAY_DATA_LOG_LEVEL"] == "ERROR"


RAY_DEPRECATION = """
import warnings
from ray.util.annotations import RayDeprecationWarning
warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be removed", RayDeprecationWarning)
warnings.warn("our own deprecation", DeprecationWarning)
"""


def test_quiet_ray_processes_drop_only_rays_internal_deprecation():
    env = os.environ | console.ray_process_env("WARNING") | {"PYTHONWARNINGS": "default"}
    loud = subprocess.run([sys.executable, "-c", RAY_DEPRECATION], env=env, capture_output=True, text=True)
    assert "exclude_resources" in loud.stderr
    env |= console.ray_process_env("WARNING")
    quiet = subprocess.run([sys.executable, "-c", RAY_DEPRECATION], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert "exclude_resources" not in quiet.stderr and "our own deprecation" in quiet.stderr
    assert "PYTHONWARNINGS" not in console.ray_process_env("INFO")


def test_a_train_worker_holds_rays_per_report_message_at_the_level():
    from ray.train.v2._internal.execution import context

    reports = logging.getLogger(context.__file__)
    before = reports.level
    try:
        console.quiet_ray_train_worker("WARNING")
        assert not reports.isEnabledFor(logging.INFO) and reports.isEnabledFor(logging.WARNING)
    finally:
        reports.setLevel(before)


def test_epoch_console_prints_each_record_once_and_estimates_time_left():
    clock, out, err = FakeClock(), io.StringIO(), io.StringIO()
    shown = console.EpochConsole(10, out=out, bar_stream=err, clock=clock)
    clock.t += 75
    first = shown.show(RECORD)                     # epoch 3 of 10: its own 60 s x 7 to go
    clock.t += 30
    second = shown.show(RECORD | {"epoch": 3})     # 30 s between epochs x 6 to go
    shown.close()
    assert out.getvalue().splitlines() == [first, second]
    assert first.endswith("elapsed 1m15s  left ~7m00s")
    assert second.startswith("epoch 4/10") and second.endswith("elapsed 1m45s  left ~3m00s")
    assert err.getvalue() == ""                    # not a terminal: no bar


def test_the_epochs_a_time_budget_plans_replace_train_epochs_in_the_line_and_the_estimate():
    clock, out = FakeClock(), io.StringIO()
    shown = console.EpochConsole(100, out=out, bar_stream=Terminal(), clock=clock)
    clock.t += 60
    line = shown.show(RECORD | {"epochs": 5})      # train.max_minutes holds five of the hundred
    assert line.startswith("epoch 3/5") and line.endswith("left ~2m00s")    # 60 s x 2 to go
    assert shown.bar.total == 5
    shown.close()


def test_a_terminal_gets_a_bar_and_the_lines_above_it():
    out, err = io.StringIO(), Terminal()
    shown = console.EpochConsole(10, out=out, bar_stream=err, clock=FakeClock())
    line = shown.show(RECORD)
    shown.close()
    assert out.getvalue().splitlines() == [line]
    assert "3/10" in err.getvalue() and "training" in err.getvalue()


def test_mlflow_progress_bar_only_off_where_nobody_watches():
    environ = {}
    console.quiet_mlflow_progress(io.StringIO(), environ)
    assert environ == {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    environ = {}
    console.quiet_mlflow_progress(Terminal(), environ)
    assert environ == {}
    environ = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"}
    console.quiet_mlflow_progress(io.StringIO(), environ)
    assert environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
