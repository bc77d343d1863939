"""The progress journal between rank 0 and the driver (pipeline/engine/progress.py)."""

import json
import time

import pytest

from pipeline.engine.progress import ProgressFollower, append_record, epoch_record

METRICS = {"epoch": 0, "train_loss": 1.0, "val_loss": 2.0, "val_miou": 0.5, "train_images_per_s": 3.0,
           "train_seconds": 4.0, "val_seconds": 1.0, "is_best": 1.0, "val_iou_car": 0.2, "lr": 0.1}


def test_a_record_keeps_what_the_epoch_line_needs():
    record = epoch_record(METRICS, epochs=5, score="val_miou", label="mIoU")
    assert record["epochs"] == 5 and record["val_score"] == 0.5 and record["score_label"] == "mIoU"
    assert "val_iou_car" not in record and "lr" not in record


def test_follower_hands_over_each_complete_line_once(tmp_path):
    path = tmp_path / "run" / "progress.jsonl"
    append_record(path, {"epoch": 0})              # before the follower: an earlier invocation's
    got = []
    follower = ProgressFollower(path, got.append)
    assert follower.poll() == 0
    append_record(path, {"epoch": 1})
    with open(path, "a") as f:
        f.write('{"epoch": 2')                     # still being written
    assert follower.poll() == 1 and got == [{"epoch": 1}]
    with open(path, "a") as f:
        f.write("}\n")
    assert follower.poll() == 1 and follower.poll() == 0
    assert got == [{"epoch": 1}, {"epoch": 2}]


def test_follower_waits_for_a_file_that_does_not_exist_yet(tmp_path):
    path = tmp_path / "later.jsonl"
    got = []
    with ProgressFollower(path, got.append, interval_s=0.05):
        append_record(path, {"epoch": 0})
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [{"epoch": 0}]                # shown while running, not only at the end
        append_record(path, {"epoch": 1})
    assert got == [{"epoch": 0}, {"epoch": 1}]      # the last poll on exit


def test_a_broken_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    follower = ProgressFollower(path, lambda r: None, interval_s=0.05)
    append_record(path, {"epoch": 0})
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match=r"progress.jsonl:2: not a JSON progress record"), follower:
        pass
    assert json.loads(path.read_text().splitlines()[0]) == {"epoch": 0}
