import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config.params import PrepareParams
from pipeline.data import shards
from pipeline.data.card import class_statistics
from pipeline.data.datasets import CAMVID_CLASSES, ClassSpec
from pipeline.prepare import PrepareError, prepare
from tests.factories import blob_mask, displayed, make_folder_dataset, random_image, rotated_jpeg


def folder_cfg(**overrides) -> PrepareParams:
    base = {"classes": ["background", "foreground"], "workers": 1}
    return PrepareParams.defaults(**(base | overrides))


def prepared_masks(out, split):
    return {key: mask for key, _, mask in shards.iter_samples(out, split)}


def test_binary_masks_stored_as_0_255_are_mapped_with_a_warning(tmp_path, caplog):
    truth = make_folder_dataset(tmp_path / "raw", n=20, binary_255=True)
    out = tmp_path / "prepared"
    card = prepare("folder", tmp_path / "raw", out, folder_cfg())

    got = {}
    for split in ("train", "val", "test"):
        got.update(prepared_masks(out, split))
    assert got.keys() == truth.keys()
    for key, mask in truth.items():
        np.testing.assert_array_equal(got[key], mask)     # 255 became 1, 0 stayed 0
    warnings = json.loads((out / "problems.json").read_text())["warnings"]
    assert warnings and "0/255" in warnings[0]["reason"] and warnings[0]["files"] == 20
    assert "0/255" in caplog.text
    assert card["train_statistics"]["pixels"]["foreground"] > 0
    assert "0/255" in (out / "card.md").read_text()


def test_masks_already_0_1_are_left_alone(tmp_path):
    truth = make_folder_dataset(tmp_path / "raw", n=6, splits=("train", "val", "test"))
    out = tmp_path / "prepared"
    prepare("folder", tmp_path / "raw", out, folder_cfg())
    assert json.loads((out / "problems.json").read_text()) == {"errors": [], "warnings": []}
    got = prepared_masks(out, "train")
    assert got.keys() == {k.removeprefix("train/") for k in truth if k.startswith("train/")}
    for key, mask in got.items():
        np.testing.assert_array_equal(mask, truth[f"train/{key}"])


def broken_dataset(root):
    """A pre-split folder with one file per kind of problem."""
    make_folder_dataset(root, n=12, num_classes=3, splits=("train", "val", "test"))
    images, masks = root / "images", root / "masks"
    (images / "train" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    (masks / "train" / "img_003.png").unlink()                                        # missing mask
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "val" / "img_001.png")  # size mismatch
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad).save(masks / "val" / "img_004.png")                          # label 7 of 3
    # the same image in train and test
    (images / "test" / "img_002.png").write_bytes((images / "train" / "img_006.png").read_bytes())
    return {
        "img_000.png": "unreadable image",
        "train/img_003.png": "missing mask",
        "val/img_001.png": "size mismatch",
        "val/img_004.png": "label values [7]",
        "test/img_002.png": "also in split test",
    }


def test_strict_mode_fails_with_the_whole_list_and_writes_nothing(tmp_path):
    expected = broken_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    cfg = folder_cfg(classes=["a", "b", "c"])
    with pytest.raises(PrepareError) as err:
        prepare("folder", tmp_path / "raw", out, cfg)
    msg = str(err.value)
    assert "5 file(s) failed" in msg
    lines = msg.splitlines()
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in lines), (name, reason, msg)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "raw"]   # no staging folder left behind


def test_lenient_mode_skips_and_reports(tmp_path):
    expected = broken_dataset(tmp_path / "raw")
    out = tmp_path / "prepared"
    card = prepare("folder", tmp_path / "raw", out, folder_cfg(classes=["a", "b", "c"], strict=False))
    report = json.loads((out / "problems.json").read_text())["errors"]
    assert len(report) == len(expected)
    assert card["splits"]["train"]["images"] == 4 - 2     # 4 train images, 2 bad
    assert card["splits"]["val"]["images"] == 4 - 2
    assert card["splits"]["test"]["images"] == 4 - 1
    assert "img_006" in prepared_masks(out, "train")          # the duplicate's train copy is kept


def test_colour_masks_are_mapped_through_the_palette(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    truth = make_folder_dataset(tmp_path / "raw", n=4, num_classes=3, splits=("train",))
    for key, mask in truth.items():
        rgb = np.array(palette, np.uint8)[mask]
        Image.fromarray(rgb).save(tmp_path / "raw" / "masks" / f"{key}.png")
    out = tmp_path / "prepared"
    cfg = folder_cfg(classes=["bg", "red", "green"], palette=palette, mask_format="color")
    with pytest.raises(PrepareError, match=r"colours not in the palette: \(1, 2, 3\)"):
        bad = np.zeros((24, 32, 3), np.uint8)
        bad[0, 0] = (1, 2, 3)
        Image.fromarray(bad).save(tmp_path / "raw" / "masks" / "train" / "img_000.png")
        prepare("folder", tmp_path / "raw", out, cfg)
    Image.fromarray(np.array(palette, np.uint8)[truth["train/img_000"]]).save(
        tmp_path / "raw" / "masks" / "train" / "img_000.png")
    prepare("folder", tmp_path / "raw", out, cfg)
    for key, mask in prepared_masks(out, "train").items():
        np.testing.assert_array_equal(mask, truth[f"train/{key}"])


def test_rgb_mask_in_index_mode_is_explained(tmp_path):
    make_folder_dataset(tmp_path / "raw", n=3, splits=("train",))
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "raw" / "masks" / "train" / "img_000.png")
    with pytest.raises(PrepareError, match="mask_format: color"):
        prepare("folder", tmp_path / "raw", tmp_path / "out", folder_cfg())


def test_resize_applies_to_train_only_and_masks_stay_class_indices(tmp_path):
    make_folder_dataset(tmp_path / "raw", n=6, num_classes=3, splits=("train", "val", "test"),
                        size=(40, 60), image_suffix=".jpg")
    out = tmp_path / "prepared"
    cfg = folder_cfg(classes=["a", "b", "c"], train_resize={"mode": "fixed", "size": [20, 24]})
    card = prepare("folder", tmp_path / "raw", out, cfg)
    assert card["splits"]["train"]["max_size"] == "20x24"
    assert card["splits"]["val"]["max_size"] == "40x60"          # evaluation keeps native size
    for _, image, mask in shards.iter_samples(out, "train"):
        assert image.shape == (20, 24, 3) and mask.shape == (20, 24)
        assert set(np.unique(mask)) <= {0, 1, 2}
    table = shards.read_split(out, "val", columns=["image_format"])
    assert set(table.column("image_format").to_pylist()) == {"jpeg"}


def test_same_inputs_give_identical_bytes(tmp_path):
    make_folder_dataset(tmp_path / "raw", n=10, binary_255=True)
    a, b = tmp_path / "a", tmp_path / "b"
    prepare("folder", tmp_path / "raw", a, folder_cfg(workers=2, images_per_shard=3))
    prepare("folder", tmp_path / "raw", b, folder_cfg(workers=1, images_per_shard=3))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 5
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_pet_trimaps_are_remapped(tmp_path):
    root = tmp_path / "pet"
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    trimap = np.array([[1, 2, 3, 2]] * 4, np.uint8)   # pet, background, border, background
    names = [f"Abyssinian_{i}" for i in range(1, 9)]
    for n in names:
        random_image(rng, 4, 4).save(root / "images" / f"{n}.jpg")
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{n}.png")
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[:6]))
    (root / "annotations" / "test.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[6:]))
    out = tmp_path / "prepared"
    card = prepare("pet", root, out, PrepareParams.defaults(workers=1, val_fraction=0.3))
    assert card["splits"]["test"]["images"] == 2
    assert card["splits"]["train"]["images"] + card["splits"]["val"]["images"] == 6
    for _, _, mask in shards.iter_samples(out, "test"):
        np.testing.assert_array_equal(mask, np.array([[1, 0, 255, 0]] * 4))
    assert json.loads((out / "classes.json").read_text())["ignore_index"] == 255


def test_builtin_dataset_refuses_a_class_list(tmp_path):
    with pytest.raises(ValueError, match="only for dataset 'folder'"):
        prepare("camvid", tmp_path, tmp_path / "out", folder_cfg())


def test_class_statistics_by_hand():
    spec = ClassSpec(("a", "b", "c"), ((0, 0, 0),) * 3, ignore_index=255)
    h1 = np.zeros(256, np.int64)
    h1[[0, 1, 255]] = [6, 2, 100]        # image 1: 8 labelled pixels
    h2 = np.zeros(256, np.int64)
    h2[0] = 4                            # image 2: 4 labelled pixels, class a only
    stats = class_statistics([h1, h2], spec)
    assert stats["pixels"] == {"a": 10, "b": 2, "c": 0}
    assert stats["frequency"]["a"] == pytest.approx(10 / 12, abs=1e-6)
    # median-frequency: f_a = 10/12, f_b = 2/8; median = (10/12 + 2/8) / 2
    med = (10 / 12 + 2 / 8) / 2
    expected = [med / (10 / 12), med / (2 / 8), 0]
    assert stats["weights"]["median_frequency"] == pytest.approx(expected, abs=1e-4)
    assert stats["weights"]["enet"][1] == pytest.approx(1 / np.log(1.02 + 2 / 12), abs=1e-4)
    assert stats["absent"] == ["c"]


def test_camvid_class_list_matches_the_segnet_split():
    assert CAMVID_CLASSES.num_classes == 11 and CAMVID_CLASSES.ignore_index == 11
    assert CAMVID_CLASSES.names[0] == "Sky" and CAMVID_CLASSES.names[-1] == "Bicyclist"


def test_palette_mode_masks_become_single_channel_indices(tmp_path):
    truth = make_folder_dataset(tmp_path / "raw", n=3, num_classes=3, splits=("train",))
    for key, mask in truth.items():          # VOC stores masks as palette ("P") PNGs
        p = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
        p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        p.save(tmp_path / "raw" / "masks" / f"{key}.png")
    out = tmp_path / "prepared"
    prepare("folder", tmp_path / "raw", out, folder_cfg(classes=["a", "b", "c"]))
    table = shards.read_split(out, "train")
    for raw in table.column("mask").to_pylist():
        assert Image.open(io.BytesIO(raw)).mode == "L"
    for key, mask in prepared_masks(out, "train").items():
        np.testing.assert_array_equal(mask, truth[f"train/{key}"])


def phone_photo_dataset(root, mask_as: str):
    """Three pre-split pairs; train/img_000 is a JPEG stored 24x40 (landscape) with EXIF
    Orientation 6, shown 40x24 (portrait); its mask is drawn on the ``displayed`` or the
    ``stored`` pixels."""
    make_folder_dataset(root, n=3, splits=("train", "val", "test"))
    ys, xs = np.meshgrid(np.arange(24), np.arange(40), indexing="ij")
    stored = np.stack([xs * 5 + 20, ys * 8 + 20, np.full_like(xs, 100)], axis=-1).astype(np.uint8)
    stored[:6, :10] = 0                                        # a dark corner a turn moves
    (root / "images" / "train" / "img_000.png").unlink()
    (root / "images" / "train" / "img_000.jpg").write_bytes(rotated_jpeg(stored, 6))
    h, w = (40, 24) if mask_as == "displayed" else (24, 40)
    mask = blob_mask(np.random.default_rng(1), h, w, 2)
    Image.fromarray(mask).save(root / "masks" / "train" / "img_000.png")
    return stored, mask


def test_exif_orientation_is_applied_to_the_image_and_the_mask_follows_the_displayed_image(tmp_path):
    stored, mask = phone_photo_dataset(tmp_path / "raw", mask_as="displayed")
    out = tmp_path / "prepared"
    card = prepare("folder", tmp_path / "raw", out, folder_cfg())
    assert card["splits"]["train"]["max_size"] == "40x24"
    (_, image, got_mask), = list(shards.iter_samples(out, "train"))
    assert image.shape == (40, 24, 3)
    assert np.abs(image.astype(int) - displayed(stored, 6)).mean() < 4     # upright pixels
    np.testing.assert_array_equal(got_mask, mask)
    raw = shards.read_split(out, "train", columns=["image"]).column("image").to_pylist()[0]
    with Image.open(io.BytesIO(raw)) as im:                          # no tag left to turn it twice
        assert im.size == (24, 40) and im.getexif().get(0x0112, 1) == 1


def test_mask_drawn_on_the_stored_pixels_of_a_turned_photo_is_a_clear_error(tmp_path):
    phone_photo_dataset(tmp_path / "raw", mask_as="stored")
    with pytest.raises(PrepareError) as err:
        prepare("folder", tmp_path / "raw", tmp_path / "prepared", folder_cfg())
    msg = str(err.value)
    assert "img_000.jpg" in msg and "size mismatch" in msg
    assert "EXIF orientation 6" in msg and "as stored" in msg
