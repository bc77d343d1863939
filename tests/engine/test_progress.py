"""The progress journal between rank 0 and the driver (pipeline/engine/progress.py)."""

import json
import time

import pytest

from pipeline.artifacts.storage import Location
from pipeline.engine.progress import ProgressFollower, append_record, epoch_record, record_names

METRICS = {"epoch": 0, "train_loss": 1.0, "val_loss": 2.0, "val_miou": 0.5, "train_images_per_s": 3.0,
           "train_seconds": 4.0, "val_seconds": 1.0, "is_best": 1.0, "val_iou_car": 0.2, "lr": 0.1}


def test_a_record_keeps_what_the_epoch_line_needs():
    record = epoch_record(METRICS, epochs=5, score="val_miou", label="mIoU")
    assert record["epochs"] == 5 and record["val_score"] == 0.5 and record["score_label"] == "mIoU"
    assert "val_iou_car" not in record and "lr" not in record


def test_follower_hands_over_each_record_once_in_epoch_order(tmp_path):
    folder = Location.local(tmp_path / "run" / "progress")
    append_record(folder, {"epoch": 0})              # before the follower: an earlier invocation's
    got = []
    follower = ProgressFollower(folder, got.append)
    assert follower.poll() == 0
    append_record(folder, {"epoch": 1})
    (tmp_path / "run" / "progress" / ".000002-abc.json.x.tmp").write_text('{"epoch": 2')   # being written
    assert follower.poll() == 1 and got == [{"epoch": 1}]
    append_record(folder, {"epoch": 10})
    append_record(folder, {"epoch": 2})
    assert follower.poll() == 2 and follower.poll() == 0
    assert got == [{"epoch": 1}, {"epoch": 2}, {"epoch": 10}]
    assert len(record_names(folder)) == 4


def test_follower_waits_for_a_folder_that_does_not_exist_yet(tmp_path):
    folder = Location.local(tmp_path / "later")
    got = []
    with ProgressFollower(folder, got.append, interval_s=0.05):
        append_record(folder, {"epoch": 0})
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [{"epoch": 0}]                # shown while running, not only at the end
        append_record(folder, {"epoch": 1})
    assert got == [{"epoch": 0}, {"epoch": 1}]      # the last poll on exit


def test_a_broken_record_names_its_file(tmp_path):
    folder = Location.local(tmp_path / "progress")
    follower = ProgressFollower(folder, lambda r: None, interval_s=0.05)
    append_record(folder, {"epoch": 0})
    folder.child("000001-broken.json").write_text("not json")
    broken = r"progress/000001-broken.json: not a JSON progress record"
    with pytest.raises(ValueError, match=broken), follower:
        pass
    assert json.loads(folder.child(record_names(folder)[0]).read_text()) == {"epoch": 0}


def test_the_journal_works_on_an_object_store(tmp_path, monkeypatch):
    from pipeline.artifacts import storage
    from tests.s3_server import S3Server

    with S3Server() as s3:
        s3.make_bucket("seg")
        for key, value in s3.env("s3://seg/x").items():
            monkeypatch.setenv(key, value)
        folder = storage.storage_from_env().location("ray_results", "train-1", "progress")
        got = []
        follower = ProgressFollower(folder, got.append)
        append_record(folder, {"epoch": 0})
        append_record(folder, {"epoch": 1})
        assert follower.poll() == 2 and got == [{"epoch": 0}, {"epoch": 1}]
        assert len(s3.keys("seg", "x/ray_results/train-1/progress/")) == 2
