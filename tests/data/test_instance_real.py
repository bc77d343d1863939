"""The instance datasets in ../shared/datasets through download and prepare (skipped without them)."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import paths
from pipeline.config.params import PrepareParams
from pipeline.data import shards
from pipeline.data.sources import DSB2018
from pipeline.download import fetch_dataset, fetch_folder
from pipeline.metrics.instance import mask_iou
from pipeline.prepare import prepare

SHARED = paths.REPO_ROOT.parent / "shared" / "datasets"
COCO80 = [f"class{i}" for i in range(80)]     # names do not matter here, only the count


def need(name):
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} is not here")
    return SHARED / name


def cfg(**overrides):
    return PrepareParams.defaults(**({"task": "instance"} | overrides))


@pytest.mark.slow      # 4,217 files copied and digested twice: 10-25 s here
def test_dsb2018_from_the_mirror(tmp_path):
    need("dsb2018")
    raw, how = fetch_dataset(DSB2018, tmp_path / "raw", SHARED)
    assert how.startswith("mirror")                       # and the recorded tree digest matched
    card = prepare("dsb2018", raw, tmp_path / "out", cfg())
    assert sum(s["images"] for s in card["splits"].values()) == 65
    assert sum(s["instances"] for s in card["splits"].values()) == 4152
    assert all(card["splits"][s]["images"] > 0 for s in ("train", "val", "test"))
    assert card["problems"] == {"errors": 0, "warnings": 0, "strict": True}
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["names"] == ["nucleus"]
    _, image, inst = next(shards.iter_instance_samples(tmp_path / "out", "test"))
    assert image.ndim == 3 and image.shape[2] == 3 and len(inst) > 0


@pytest.mark.slow
def test_coco128_seg_yolo_with_its_real_inconsistencies(tmp_path):
    root = need("coco128-seg")
    raw, _ = fetch_folder(root, tmp_path / "raw", "yolo")
    card = prepare("yolo", raw, tmp_path / "out", cfg(classes=COCO80, strict=False))
    assert sum(s["images"] for s in card["splits"].values()) == 126 + 2       # pairs + unlabelled kept
    assert sum(s["images_without_instances"] for s in card["statistics"].values()) == 2
    problems = json.loads((tmp_path / "out" / "problems.json").read_text())
    orphans = [e for e in problems["errors"] if "label file without an image" in e["reasons"][0]]
    assert len(orphans) == len(problems["errors"]) == 2
    assert "2 image(s) without a label file" in problems["warnings"][0]["reason"]
    # The README's 941 instances are in all 128 label files; the 2 without an image hold 12.
    orphan_lines = sum(len(Path(e["file"]).read_text().splitlines()) for e in orphans)
    assert sum(s["instances"] for s in card["splits"].values()) + orphan_lines == 941


def test_labelme_samples_and_their_coco_export_give_the_same_instances(tmp_path):
    root = need("annotation-samples")
    no_split = {"val_fraction": 0.0, "test_fraction": 0.0}
    prepare("labelme", root / "labelme", tmp_path / "labelme", cfg(**no_split))
    prepare("coco", root / "coco-export", tmp_path / "coco", cfg(**no_split))
    names = [json.loads((tmp_path / d / "classes.json").read_text())["names"] for d in ("labelme", "coco")]
    assert names[0] == names[1] and len(names[0]) == 20 and "_background_" not in names[0]
    a = {k: inst for k, _, inst in shards.iter_instance_samples(tmp_path / "labelme", "train")}
    b = {k: inst for k, _, inst in shards.iter_instance_samples(tmp_path / "coco", "train")}
    assert a.keys() == b.keys() == {"2011_000003", "2011_000006", "2011_000025"}
    assert sum(len(i) for i in a.values()) == 12
    for key in a:
        assert a[key].classes == b[key].classes
        iou = mask_iou(a[key].masks, b[key].masks)
        assert np.diag(iou).min() > 0.999, (key, np.diag(iou))
        assert a[key].boxes == b[key].boxes
    ignore = shards.read_split(tmp_path / "labelme", "train", columns=["ignore"]).column("ignore").to_pylist()
    assert sum(v is not None for v in ignore) == 2           # the __ignore__ regions of two photos
