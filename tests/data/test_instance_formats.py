"""Instance importers through prepare (task: instance): tiny exports written here in each format."""

import base64
import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as cocomask

from pipeline.config.params import PrepareParams
from pipeline.data import shards
from pipeline.prepare import PrepareError, prepare

H, W = 40, 60


def cfg(**overrides) -> PrepareParams:
    base = {"task": "instance", "workers": 1, "val_fraction": 0.0, "test_fraction": 0.0}
    return PrepareParams.defaults(**(base | overrides))


def image(path, h=H, w=W, mode="RGB", seed=None):
    """Random pixels, different for every path (the same bytes twice would be duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = zlib.crc32(str(path).encode()) if seed is None else seed
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").convert(mode).save(path)
    return path


def rows(out, split="train"):
    return {k: (img, inst) for k, img, inst in shards.iter_instance_samples(out, split)}


def masks(inst):
    return [cocomask.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in inst.masks]


def square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# -- COCO -----------------------------------------------------------------------------

def coco_export(root, images=("a.png", "b.png"), annotations=None, categories=None):
    for name in images:
        image(root / "imgs" / name)
    full = np.zeros((H, W), np.uint8)
    full[5:15, 10:30] = 1
    rle = cocomask.encode(np.asfortranarray(full))
    uncompressed = {"size": [H, W], "counts": [int(c) for c in _runs(full)]}
    data = {
        "images": [{"id": i + 1, "file_name": f"imgs/{n}", "height": H, "width": W}
                   for i, n in enumerate(images)],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 1, "category_id": 2, "segmentation": [square(10, 10, 20, 30)],
             "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": uncompressed, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}, "iscrowd": 0},
        ],
        "categories": categories or [{"id": 0, "name": "_background_"}, {"id": 2, "name": "dog"},
                                     {"id": 1, "name": "cat"}],
    }
    (root / "annotations.json").write_text(json.dumps(data))
    return full


def _runs(mask):
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = mask.T.ravel()
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def test_coco_polygons_rle_and_crowd(tmp_path):
    full = coco_export(tmp_path / "raw")
    out = tmp_path / "out"
    card = prepare("coco", tmp_path / "raw", out, cfg())
    classes = json.loads((out / "classes.json").read_text())
    # category id order, and no _background_ (it has no annotations)
    assert classes["names"] == ["cat", "dog"] and classes["isthing"] == [True, True]
    got = rows(out)
    _, inst = got["a"]
    assert inst.classes == [1, 0] and inst.iscrowd == [0, 1]
    square_mask, crowd = masks(inst)
    assert square_mask.sum() == 10 * 20 and square_mask[10:30, 10:20].all()     # COCO pixel edges
    assert inst.boxes[0] == [10, 10, 20, 30]
    np.testing.assert_array_equal(crowd, full)
    np.testing.assert_array_equal(masks(got["b"][1])[0], full)
    assert card["task"] == "instance"
    assert card["splits"]["train"] == {"images": 2, "instances": 3, "crowd": 1, "shards": 1,
                                       "min_size": "40x60", "max_size": "40x60"}
    assert card["statistics"]["train"]["instances"] == {"cat": 1, "dog": 1}


def test_coco_every_problem_kind_is_listed_in_strict_mode(tmp_path):
    root = tmp_path / "raw"
    coco_export(root, images=("a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"), annotations=[
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square(10, 10, 70, 20)]},   # outside
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 5]]},            # 2 points
        {"id": 3, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 5, 5, 9, 9]]},      # zero area
        {"id": 4, "image_id": 4, "category_id": 9, "segmentation": [square(1, 1, 5, 5)]},      # category
        {"id": 5, "image_id": 5, "category_id": 1, "segmentation": [square(1, 1, 5, 5)]},
        {"id": 5, "image_id": 5, "category_id": 1, "segmentation": [square(6, 6, 9, 9)]},      # dup id
        {"id": 7, "image_id": 42, "category_id": 1, "segmentation": [square(1, 1, 5, 5)]},     # no image
        {"id": 8, "image_id": 6, "category_id": 1, "segmentation": [square(1, 1, 5, 5)]},
        {"id": 9, "image_id": 7, "category_id": 1, "segmentation": [square(1, 1, 5, 5)]},
    ])
    (root / "imgs" / "f.png").write_bytes(b"\x89PNG not really")                            # unreadable
    (root / "imgs" / "g.png").unlink()                                                        # missing
    data = json.loads((root / "annotations.json").read_text())
    data["images"].append({"id": 1, "file_name": "imgs/b.png", "height": H, "width": W})  # dup image id
    (root / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(PrepareError) as err:
        prepare("coco", root, tmp_path / "out", cfg())
    msg = str(err.value)
    for reason in ("polygon outside the image", "degenerate polygon: 2 point(s)",
                   "degenerate polygon: zero area",
                   "unknown category_id 9", "duplicate annotation id", "image_id 42 is not an image",
                   "unreadable image", "missing image", "duplicate image id 1"):
        assert reason in msg, (reason, msg)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]     # no staging folder left


def test_lenient_mode_skips_images_or_instances_and_reports_which(tmp_path):
    root = tmp_path / "raw"
    coco_export(root, images=("a.png", "b.png", "c.png"), annotations=[
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [square(10, 10, 70, 20)]},   # outside
        {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [square(1, 1, 9, 9)]},
        {"id": 3, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 5]]},            # degenerate
        {"id": 4, "image_id": 3, "category_id": 1,
         "segmentation": [square(-0.8, 2, 5, 40.9)]},                                          # clipped
    ])
    out = tmp_path / "out"
    card = prepare("coco", root, out, cfg(strict=False))
    errors = json.loads((out / "problems.json").read_text())["errors"]
    by_file = {e["file"].rsplit("/", 1)[1]: e for e in errors}
    assert by_file["a.png"]["skipped"] == "image"
    assert by_file["b.png"]["skipped"] == "instances" and "degenerate" in by_file["b.png"]["reasons"][0]
    assert "c.png" not in by_file
    got = rows(out)
    assert set(got) == {"b", "c"} and len(got["b"][1]) == 1
    assert got["c"][1].boxes == [[0, 2, 5, 40]]                  # within 1 px: clipped to the image
    assert card["problems"] == {"errors": 2, "warnings": 0, "strict": False}


# -- LabelMe --------------------------------------------------------------------------

def labelme_json(path, shapes, image_path="a.png", embed=None):
    data = {"version": "5.2.1", "flags": {}, "shapes": [
        {"label": label, "points": pts, "group_id": group, "shape_type": kind, "flags": {}}
        for label, pts, group, kind in shapes],
        "imagePath": image_path, "imageData": embed, "imageHeight": H, "imageWidth": W}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_labelme_groups_rectangles_circles_ignore_and_embedded_images(tmp_path):
    root = tmp_path / "raw"
    (root).mkdir()
    (root / "labels.txt").write_text("__ignore__\n_background_\ncar\nperson\n")
    image(root / "ann" / "a.png")
    labelme_json(root / "ann" / "a.json", [
        ("person", [[2, 2], [10, 2], [10, 10], [2, 10]], 1, "polygon"),
        ("person", [[20, 2], [30, 2], [30, 10]], 1, "polygon"),            # same group: one instance
        ("car", [[40, 20], [50, 30]], None, "rectangle"),
        ("car", [[20, 30], [25, 30]], None, "circle"),
        ("__ignore__", [[0, 35], [60, 35], [60, 40], [0, 40]], None, "polygon"),
        ("person", [[1, 1], [2, 2]], None, "line"),                         # not a region
    ])
    buf = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 7, np.uint8)).save(buf, format="PNG")
    labelme_json(root / "ann" / "b.json", [("car", [[1, 1], [9, 1], [9, 9]], None, "polygon")],
                 image_path="not_here.png", embed=base64.b64encode(buf.getvalue()).decode())
    out = tmp_path / "out"
    card = prepare("labelme", root, out, cfg(strict=False))
    assert json.loads((out / "classes.json").read_text())["names"] == ["car", "person"]
    got = rows(out)
    _, a = got["a"]
    assert a.classes == [1, 0, 0]
    person, rect, circle = masks(a)
    assert person[2:10, 2:10].all() and person[3, 28] and not person[2:10, 12:18].any()
    assert rect.sum() == 100 and a.boxes[1] == [40, 20, 50, 30]
    assert abs(circle.sum() - np.pi * 25) < 8
    table = shards.read_split(out, "train", columns=["id", "ignore"]).to_pylist()
    ignore = {r["id"]: r["ignore"] for r in table}
    assert ignore["b"] is None
    np.testing.assert_array_equal(cocomask.decode({"size": [H, W], "counts": ignore["a"]})[35:].all(), True)
    img_b, _ = got["b"]
    assert (img_b == 7).all()                                    # from imageData
    errors = json.loads((out / "problems.json").read_text())["errors"]
    assert len(errors) == 1 and "'line' is not a region" in errors[0]["reasons"][0]
    assert card["splits"]["train"]["instances"] == 4


def test_labelme_unknown_label_and_class_list_needed(tmp_path):
    root = tmp_path / "raw"
    image(root / "a.png")
    labelme_json(root / "a.json", [("horse", [[2, 2], [10, 2], [10, 10]], None, "polygon")])
    with pytest.raises(ValueError, match="prepare.classes, or put labels.txt"):
        prepare("labelme", root, tmp_path / "out", cfg())
    with pytest.raises(PrepareError, match="unknown label 'horse'"):
        prepare("labelme", root, tmp_path / "out", cfg(classes=["car"]))


# -- VIA ------------------------------------------------------------------------------

def balloon_file(folder, names):
    """VIA 1.x via_region_data.json as in the Mask R-CNN balloon tutorial (regions as a dict)."""
    data = {}
    for i, name in enumerate(names):
        image(folder / name)
        data[f"{name}{1000 + i}"] = {
            "fileref": "", "size": 1000 + i, "filename": name, "base64_img_data": "", "file_attributes": {},
            "regions": {"0": {"shape_attributes": {"name": "polygon", "all_points_x": [5, 25, 25, 5],
                                                    "all_points_y": [5, 5, 20, 20]},
                              "region_attributes": {}}},
        }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "via_region_data.json").write_text(json.dumps(data))


def test_via1_balloon_layout_keeps_its_train_val_split_and_has_one_class(tmp_path):
    root = tmp_path / "raw"
    balloon_file(root / "train", [f"t{i}.jpg" for i in range(6)])
    balloon_file(root / "val", ["v0.jpg", "v1.jpg"])
    card = prepare("via", root, tmp_path / "out", cfg(val_fraction=0.2, test_fraction=0.3))
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["names"] == ["object"]
    assert card["splits"]["val"]["images"] == 2
    assert card["splits"]["train"]["images"] + card["splits"]["test"]["images"] == 6
    assert card["splits"]["test"]["images"] > 0                  # test carved out of train
    for split in ("train", "val", "test"):
        for _, (_, inst) in rows(tmp_path / "out", split).items():
            assert inst.boxes == [[5, 5, 25, 20]]


def test_via2_project_with_a_class_attribute_and_all_shapes(tmp_path):
    root = tmp_path / "raw"
    image(root / "img.png")
    regions = [
        {"shape_attributes": {"name": "rect", "x": 2, "y": 3, "width": 10, "height": 5},
         "region_attributes": {"kind": "cell"}},
        {"shape_attributes": {"name": "circle", "cx": 30, "cy": 20, "r": 6},
         "region_attributes": {"kind": {"nucleus": True, "cell": False}}},
        {"shape_attributes": {"name": "ellipse", "cx": 45, "cy": 20, "rx": 8, "ry": 3, "theta": 1.5708},
         "region_attributes": {"kind": "cell"}},
        {"shape_attributes": {"name": "polyline", "all_points_x": [1, 10, 5], "all_points_y": [30, 30, 38]},
         "region_attributes": {"kind": "__ignore__"}},
        {"shape_attributes": {"name": "point", "cx": 3, "cy": 3}, "region_attributes": {"kind": "cell"}},
    ]
    project = {
        "_via_settings": {"core": {"default_filepath": ""}},
        "_via_img_metadata": {"img.png-1": {"filename": "img.png", "size": -1, "regions": regions,
                                            "file_attributes": {}}},
        "_via_attributes": {"region": {"kind": {"type": "dropdown", "options": {"nucleus": "", "cell": ""},
                                                "default_options": {}}}, "file": {}},
    }
    (root / "project.json").write_text(json.dumps(project))
    out = tmp_path / "out"
    prepare("via", root, out, cfg(class_attribute="kind", strict=False))
    assert json.loads((out / "classes.json").read_text())["names"] == ["nucleus", "cell"]
    _, inst = rows(out)["img"]
    assert inst.classes == [1, 0, 1]
    rect, circle, ell = masks(inst)
    assert rect.sum() == 50
    assert abs(circle.sum() - np.pi * 36) < 10
    x0, y0, x1, y1 = inst.boxes[2]
    assert (x1 - x0) < (y1 - y0)                                  # turned a quarter: taller than wide
    errors = json.loads((out / "problems.json").read_text())["errors"]
    assert "'point' is not a region" in errors[0]["reasons"][0] and errors[0]["skipped"] == "instances"
    table = shards.read_split(out, "train", columns=["ignore"]).to_pylist()
    assert table[0]["ignore"] is not None


def test_via_class_attribute_without_a_class_list_names_the_values_found(tmp_path):
    root = tmp_path / "raw"
    balloon_file(root, ["a.jpg"])
    data = json.loads((root / "via_region_data.json").read_text())
    next(iter(data.values()))["regions"]["0"]["region_attributes"] = {"name": "balloon"}
    (root / "via_region_data.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"prepare.classes.*found: \['balloon'\]"):
        prepare("via", root, tmp_path / "out", cfg(class_attribute="name"))


# -- YOLO -----------------------------------------------------------------------------

def yolo_export(root):
    for stem in ("a", "b", "c"):
        image(root / "images" / "train" / f"{stem}.jpg")
    image(root / "images" / "val" / "d.jpg")
    labels = root / "labels"
    (labels / "train").mkdir(parents=True)
    (labels / "val").mkdir(parents=True)
    (labels / "train" / "a.txt").write_text("1 0.1 0.25 0.5 0.25 0.5 0.75 0.1 0.75\n"
                                            "0 0.6 0.1 0.9 0.1 0.9 0.5\n")
    (labels / "train" / "b.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")
    (labels / "train" / "orphan.txt").write_text("0 0.1 0.1 0.2 0.1 0.2 0.2\n")    # no image
    (labels / "val" / "d.txt").write_text("1 0.2 0.2 0.4 0.2 0.4 0.4\n")         # c has no label
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                    "names:\n  0: cat\n  1: dog\n")


def test_yolo_polygons_images_without_labels_and_labels_without_images(tmp_path):
    root = tmp_path / "raw"
    yolo_export(root)
    with pytest.raises(PrepareError, match="orphan.txt: label file without an image"):
        prepare("yolo", root, tmp_path / "out", cfg())
    out = tmp_path / "out"
    card = prepare("yolo", root, out, cfg(strict=False))
    assert json.loads((out / "classes.json").read_text())["names"] == ["cat", "dog"]
    assert card["splits"]["train"]["images"] == 3 and card["splits"]["val"]["images"] == 1
    assert card["statistics"]["train"]["images_without_instances"] == 1          # c, kept
    problems = json.loads((out / "problems.json").read_text())
    assert [e["skipped"] for e in problems["errors"]] == ["file"]
    assert "c.jpg" in problems["warnings"][0]["reason"]
    _, a = rows(out)["a"]
    assert a.classes == [1, 0] and a.boxes[0] == [6, 10, 30, 30]                 # 0..1 of 60x40


def test_yolo_needs_class_names(tmp_path):
    root = tmp_path / "raw"
    yolo_export(root)
    (root / "data.yaml").unlink()
    with pytest.raises(ValueError, match="data.yaml"):
        prepare("yolo", root, tmp_path / "out", cfg())
    with pytest.raises(PrepareError, match=r"unknown class index 1 \(classes 0..0\)"):
        prepare("yolo", root, tmp_path / "out", cfg(classes=["cat"]))


# -- DSB 2018 layout ------------------------------------------------------------------

def dsb_folder(root, name, masks_, mode="RGBA", size=(H, W)):
    image(root / "stage1_test" / name / "images" / f"{name}.png", *size, mode=mode)
    for i, m in enumerate(masks_):
        path = root / "stage1_test" / name / "masks" / f"m{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(path)


def nucleus(y, x, r=4, size=(H, W)):
    yy, xx = np.mgrid[:size[0], :size[1]]
    return (((yy - y) ** 2 + (xx - x) ** 2 <= r * r) * 255).astype(np.uint8)


def test_dsb2018_masks_per_nucleus_and_their_problems(tmp_path):
    root = tmp_path / "raw"
    dsb_folder(root, "img1", [nucleus(10, 10), nucleus(20, 40)])
    dsb_folder(root, "img2", [nucleus(10, 10)], mode="L")
    dsb_folder(root, "img3", [nucleus(10, 10)[:30]])                           # mask size mismatch
    dsb_folder(root, "img4", [nucleus(10, 10), np.zeros((H, W), np.uint8)])     # an empty mask
    with pytest.raises(PrepareError) as err:
        prepare("dsb2018", root, tmp_path / "out", cfg())
    assert "mask size mismatch: mask m0.png is 60x30" in str(err.value)
    assert "masks/m1.png: empty mask" in str(err.value)
    out = tmp_path / "out"
    card = prepare("dsb2018", root, out, cfg(strict=False))
    assert card["splits"]["train"]["images"] == 3 and card["splits"]["train"]["instances"] == 4
    got = rows(out)
    img, inst = got["img1"]
    assert img.shape == (H, W, 3) and inst.classes == [0, 0]
    np.testing.assert_array_equal(masks(inst)[1], nucleus(20, 40) > 0)
    assert got["img2"][0].shape == (H, W, 3)                                   # grey -> RGB
    with pytest.raises(ValueError, match="its one class is 'nucleus'"):
        prepare("dsb2018", root, out, cfg(classes=["cell"]))


# -- what every instance dataset shares -----------------------------------------------

def test_resize_applies_to_masks_and_boxes(tmp_path):
    root = tmp_path / "raw"
    dsb_folder(root, "img1", [nucleus(10, 10), nucleus(30, 50, r=1)])
    out = tmp_path / "out"
    card = prepare("dsb2018", root, out, cfg(train_resize={"mode": "fixed", "size": [20, 30]}))
    img, inst = rows(out)["img1"]
    assert img.shape == (20, 30, 3) and inst.masks[0]["size"] == [20, 30]
    x0, y0, x1, y1 = inst.boxes[0]
    assert 2 <= x0 <= 4 and 7 <= x1 <= 8 and (x0, y0, x1, y1) == tuple(inst.boxes[0])
    assert card["splits"]["train"]["max_size"] == "20x30"


def test_same_inputs_give_identical_bytes(tmp_path):
    root = tmp_path / "raw"
    for i in range(7):
        dsb_folder(root, f"img{i}", [nucleus(10, 10 + i), nucleus(25, 40)])
    a, b = tmp_path / "a", tmp_path / "b"
    prepare("dsb2018", root, a, cfg(workers=2, images_per_shard=2, val_fraction=0.2, test_fraction=0.2))
    prepare("dsb2018", root, b, cfg(workers=1, images_per_shard=2, val_fraction=0.2, test_fraction=0.2))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) > 6
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_task_and_dataset_must_agree(tmp_path):
    with pytest.raises(ValueError, match="download.dataset 'coco'.*prepare.task is 'semantic'"):
        prepare("coco", tmp_path, tmp_path / "out", cfg(task="semantic"))
    with pytest.raises(ValueError, match="prepare.task 'instance'.*download.dataset 'camvid'"):
        prepare("camvid", tmp_path, tmp_path / "out", cfg())
