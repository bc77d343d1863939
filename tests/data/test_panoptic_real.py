"""The COCO panoptic sample in ../shared/datasets through download and prepare (skipped without it)."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import paths
from pipeline.config.params import PrepareParams
from pipeline.data import shards
from pipeline.download import fetch_folder
from pipeline.metrics.panoptic_types import rgb_to_ids
from pipeline.prepare import prepare

SHARED = paths.REPO_ROOT.parent / "shared" / "datasets"
SAMPLE = "coco-panoptic-sample"


def need(name):
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} is not here")
    return SHARED / name


def cfg(**overrides):
    base = {"task": "panoptic", "workers": 1, "val_fraction": 0.0, "test_fraction": 0.0}
    return PrepareParams.defaults(**(base | overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The sample copied by the download stage, prepared from its RGB and its 2-channel PNGs."""
    tmp = tmp_path_factory.mktemp("panoptic")
    raw, _ = fetch_folder(need(SAMPLE), tmp / "raw", "coco_panoptic")
    cards = {fmt: prepare("coco_panoptic", raw, tmp / fmt, cfg(panoptic_format=fmt))
             for fmt in ("rgb", "two_channel")}
    return raw, tmp, cards


def test_the_sample_gives_18_and_32_segments_with_coco_areas_and_boxes(prepared):
    raw, tmp, cards = prepared
    data = json.loads((raw / "sample_data" / "panoptic_examples.json").read_text())
    rows = {r["id"]: r for r in shards.read_split(tmp / "rgb", "train").to_pylist()}
    assert {k: len(r["segments"]) for k, r in rows.items()} == {"000000142238": 18, "000000439180": 32}
    card = cards["rgb"]
    assert card["problems"] == {"errors": 0, "warnings": 0, "strict": True}
    assert {k: card["splits"]["train"][k] for k in ("images", "segments", "things", "stuff", "crowd")} == {
        "images": 2, "segments": 50, "things": 40, "stuff": 7, "crowd": 3}
    index = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    pngs = raw / "sample_data" / "panoptic_examples"
    for ann in data["annotations"]:
        row = rows[ann["file_name"][:-4]]
        got = sorted((s["class"], s["iscrowd"], s["area"], tuple(s["box"])) for s in row["segments"])
        want = sorted((index[s["category_id"]], bool(s["iscrowd"]), s["area"],
                       (s["bbox"][0], s["bbox"][1], s["bbox"][0] + s["bbox"][2], s["bbox"][1] + s["bbox"][3]))
                      for s in ann["segments_info"])
        assert got == want
        original = rgb_to_ids(np.asarray(Image.open(pngs / ann["file_name"])))
        ours = shards.decode_panoptic(row).ids
        assert ((original == 0) == (ours == 0)).all()          # void where COCO has void


def test_isthing_and_colours_come_from_the_categories(prepared):
    raw, tmp, _ = prepared
    categories = json.loads((raw / "panoptic_coco_categories.json").read_text())
    categories.sort(key=lambda c: c["id"])
    classes = json.loads((tmp / "rgb" / "classes.json").read_text())
    assert classes["num_classes"] == 133 and sum(classes["isthing"]) == 80
    assert classes["names"] == [c["name"] for c in categories]
    assert classes["isthing"] == [bool(c["isthing"]) for c in categories]
    assert classes["palette"] == [c["color"] for c in categories]


def test_rgb_and_two_channel_exports_prepare_to_the_same_rows(prepared):
    _, tmp, cards = prepared
    a = shards.read_split(tmp / "rgb", "train").to_pylist()
    b = shards.read_split(tmp / "two_channel", "train").to_pylist()
    assert len(a) == 2 and a == b
    assert cards["rgb"]["splits"] == cards["two_channel"]["splits"]


@pytest.mark.slow      # 701 CamVid images read and written: 45-70 s on 2 cores
def test_camvid_with_three_thing_classes_is_the_panoptic_benchmark(tmp_path):
    root = need("camvid")
    things = ["Car", "Pedestrian", "Bicyclist"]
    cfg_camvid = PrepareParams.defaults(task="panoptic", thing_classes=things, min_component_area=10)
    card = prepare("camvid", root, tmp_path / "out", cfg_camvid)
    splits = card["splits"]
    assert {s: d["images"] for s, d in splits.items()} == {"train": 367, "val": 101, "test": 233}
    assert card["problems"] == {"errors": 0, "warnings": 0, "strict": True}
    assert all(d["segments"] == d["things"] + d["stuff"] and d["crowd"] == 0 for d in splits.values())
    # Measured 2026-12-03 (the tree digest in pipeline/data/sources.py pins the data).
    assert {s: (d["things"], d["stuff"], d["voided_fragments"]) for s, d in splits.items()} == {
        "train": (3135, 2656, 351), "val": (669, 808, 152), "test": (1464, 1707, 462)}
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["ignore_index"] == 11
    assert [n for n, t in zip(classes["names"], classes["isthing"], strict=True) if t] == things
    stats = card["statistics"]["test"]
    assert stats["images_with"]["Road"] == 233 and stats["segments"]["Car"] > stats["images_with"]["Car"]
    _, image, truth = next(shards.iter_panoptic_samples(tmp_path / "out", "test"))
    assert image.shape == (360, 480, 3) and truth.ids.shape == (360, 480)
    assert truth.semantic(11).max() <= 11
