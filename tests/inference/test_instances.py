"""Instances of whole images (pipeline.inference.instances): model outputs to COCO RLE
instances, tiles that give what the whole image gives, objects cut by tile borders joined
into one, and a tiled prediction that holds a tile's worth, not the image's."""

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as rle
from torch import nn

from pipeline.inference.instances import InstancePredictor, Piece, select, to_instances
from pipeline.inference.rle import from_crop, runs
from pipeline.metrics.instance import Instances, encode
from pipeline.models.base import InferenceSettings, ModelMeta

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("cell", "red cell")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class BlobNet(nn.Module):
    """A stand-in instance model with the Mask R-CNN eval contract: each 8-connected blob of
    pixels brighter than a threshold is an instance; its class is 1 where red outweighs green,
    else 0; its score the blob's mean brightness in [0, 1]; its mask 0.9 on the blob, 0.1 off.
    A blob's pixels decide everything about it, so a window sees what the whole image sees
    of every blob it holds whole. ``calls`` records the input shapes."""

    def __init__(self, meta: ModelMeta | None = None):
        super().__init__()
        self.meta = meta or ModelMeta(CLASSES, mean=MEAN, std=STD)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.calls.append(tuple(x.shape))
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (self.meta.mean, self.meta.std))
        pixels = x * std + mean
        return [self._one(p.permute(1, 2, 0).numpy()) for p in pixels]

    @staticmethod
    def _one(rgb: np.ndarray) -> dict[str, torch.Tensor]:
        bright = rgb.mean(2)
        on = (bright > 0.3).astype(np.uint8)
        count, ids, stats, _ = cv2.connectedComponentsWithStats(on, connectivity=8)
        boxes, labels, scores, masks = [], [], [], []
        for k in range(1, count):
            on = ids == k
            x, y, w, h = stats[k, :4]
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rgb[on, 0].mean() > rgb[on, 1].mean() + 0.1))
            scores.append(float(bright[on].mean()))
            masks.append(np.where(on, 0.9, 0.1)[None])
        h, w = bright.shape
        return {"boxes": torch.tensor(np.array(boxes, np.float32).reshape(-1, 4)),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "masks": torch.tensor(np.array(masks, np.float32).reshape(-1, 1, h, w))}


def draw(h: int, w: int, blobs: list[tuple], seed: int = 0) -> np.ndarray:
    """A dark noisy image with filled blobs: (kind, params, grey level, red) each,
    kind "circle" (cx, cy, r) or "rect" (x0, y0, x1, y1); each blob's grey level distinct."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    for kind, params, level, red in blobs:
        colour = (level, level // 3, level // 3) if red else (level, level, level)
        if kind == "circle":
            cv2.circle(image, params[:2], params[2], colour, -1)
        else:
            cv2.rectangle(image, params[:2], (params[2] - 1, params[3] - 1), colour, -1)
    return image


def decoded(instances: Instances) -> list[np.ndarray]:
    return [rle.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool)
            for m in instances.masks]


def as_set(instances: Instances) -> set:
    """Each instance as (class, score, box, mask counts): comparable regardless of order."""
    rows = zip(instances.classes, instances.scores, instances.boxes, instances.masks, strict=True)
    return {(c, round(s, 6), tuple(round(v, 3) for v in b), m["counts"]) for c, s, b, m in rows}


def test_to_instances_thresholds_orders_and_encodes():
    masks = torch.zeros(4, 1, 12, 16)
    masks[0, 0, 2:5, 3:7] = 0.8          # score 0.3
    masks[1, 0, 6:10, 1:4] = 0.6         # score 0.9
    masks[2, 0] = 0.4                    # score 0.7: empty once thresholded
    masks[3, 0, 0:2, 10:16] = 0.51       # score 0.5
    output = {"boxes": torch.tensor([[3, 2, 7, 5], [1, 6, 4, 10], [0, 0, 16, 12], [10, -1, 17, 2]]),
              "labels": torch.tensor([2, 0, 1, 1]), "scores": torch.tensor([0.3, 0.9, 0.7, 0.5]),
              "masks": masks}
    got = to_instances(output, 12, 16)
    assert got.scores == pytest.approx([0.9, 0.5, 0.3]) and got.classes == [0, 1, 2]
    assert got.boxes == [[1.0, 6.0, 4.0, 10.0], [10.0, 0.0, 16.0, 2.0], [3.0, 2.0, 7.0, 5.0]]   # clipped
    assert all(isinstance(v, float) for box in got.boxes for v in box)
    for mask, k in zip(decoded(got), [1, 3, 0], strict=True):
        np.testing.assert_array_equal(mask, masks[k, 0].numpy() > 0.5)
    assert to_instances(output, 12, 16, score_threshold=0.5).scores == pytest.approx([0.9, 0.5])
    assert to_instances(output, 12, 16, max_instances=2).classes == [0, 1]
    assert len(to_instances(output, 12, 16, mask_threshold=0.9)) == 0
    # A padded output is cropped to the image.
    assert to_instances(output, 10, 15).masks[0]["size"] == [10, 15]
    assert select(got, 0.4).scores == pytest.approx([0.9, 0.5])
    assert select(got, max_instances=1).classes == [0]


def test_to_instances_of_many_masks_keeps_order_across_chunks():
    k = 40
    masks = torch.zeros(k, 1, 8, 50)
    for i in range(k):
        masks[i, 0, i % 8, i:i + 3] = 1.0
    scores = torch.linspace(0.1, 0.9, k)
    output = {"boxes": torch.zeros(k, 4), "labels": torch.arange(k), "scores": scores, "masks": masks}
    got = to_instances(output, 8, 50)
    assert got.classes == list(range(k - 1, -1, -1))
    for mask, i in zip(decoded(got), got.classes, strict=True):
        np.testing.assert_array_equal(mask, masks[i, 0].numpy() > 0.5)
    assert to_instances(output, 8, 50, max_instances=20).classes == list(range(k - 1, k - 21, -1))


def test_rle_from_a_crop_and_its_runs_match_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = rng.integers(1, 40, 2)
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        crop = rng.random((h, w)) < rng.random()
        full = np.zeros((height, width), bool)
        full[top:top + h, left:left + w] = crop
        expected = encode(full[None])[0]
        assert from_crop(crop, top, left, height, width) == expected
        starts, stops = runs(expected)
        flat = np.zeros(height * width, bool)
        for a, b in zip(starts, stops, strict=True):
            flat[a:b] = True
        np.testing.assert_array_equal(flat.reshape(width, height).T, full)
    with pytest.raises(ValueError, match="not inside"):
        from_crop(np.ones((3, 3), bool), 2, 0, 4, 4)


# Windows of 64 x 80 with overlap 0.25 over 200 x 260: rows start at 0, 48, 96, 136;
# columns at 0, 60, 120, 180. Blobs inside one window only, or (the last) whole inside the
# band four windows share (columns 60-80, rows 48-64).
AWAY = [("circle", (25, 25, 10), 250, False), ("circle", (160, 20, 12), 200, True),
        ("rect", (20, 165, 45, 190), 230, False), ("circle", (230, 80, 9), 180, True),
        ("rect", (70, 50, 78, 60), 160, False)]


@pytest.fixture
def tiled_and_whole():
    model = BlobNet()
    whole = InstancePredictor(model)
    tiled = InstancePredictor(model, tile_above_pixels=4096, tile_size=(64, 80), tile_overlap=0.25)
    return model, whole, tiled


def test_tiles_give_the_whole_images_instances_for_objects_away_from_borders(tiled_and_whole):
    model, whole, tiled = tiled_and_whole
    image = draw(200, 260, AWAY)
    expected = whole.instances([image])[0]
    assert len(expected) == len(AWAY)
    model.calls.clear()
    got = tiled.instances([image])[0]
    assert as_set(got) == as_set(expected)
    assert got.scores == sorted(got.scores, reverse=True)
    assert {shape[2:] for shape in model.calls} == {(64, 80)} and len(model.calls) == 16


CUT = [("rect", (50, 30, 100, 70), 240, False),      # across column borders 60-80 and row borders 48-64
       ("circle", (130, 150, 40), 210, True),        # larger than a window: cut four ways
       ("rect", (0, 90, 260, 104), 190, False),      # a strip across the whole width: 4 windows in a row
       ("circle", (230, 30, 8), 170, False)]         # away from borders


def test_an_object_cut_by_tile_borders_comes_back_as_one_instance_with_its_whole_mask(tiled_and_whole):
    _, whole, tiled = tiled_and_whole
    image = draw(200, 260, CUT)
    expected = whole.instances([image])[0]
    got = tiled.instances([image])[0]
    assert len(expected) == len(CUT) and len(got) == len(CUT)
    assert as_set(got) == as_set(expected)
    assert set(got.classes) == {0, 1}
    for mask, box in zip(decoded(got), got.boxes, strict=True):       # boxes: the joined pieces' union
        ys, xs = np.nonzero(mask)
        assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_one_window_sees_a_cut_object_in_two_parts_and_still_one_instance_comes_back(tiled_and_whole):
    # A U: in the top-left window (rows 0-64) its arms are two blobs; the window below (rows
    # 48-112) holds the bottom that joins them, so both arms join through it.
    _, whole, tiled = tiled_and_whole
    image = draw(200, 260, [("rect", (10, 10, 20, 78), 220, False), ("rect", (40, 10, 50, 78), 220, False),
                            ("rect", (10, 70, 50, 78), 220, False)])
    got, expected = tiled.instances([image])[0], whole.instances([image])[0]
    assert len(got) == len(expected) == 1
    assert as_set(got) == as_set(expected)


def test_one_windows_own_overlapping_instances_are_left_as_the_model_gave_them():
    """The model's own duplicates inside one window are its business (its NMS): tiling keeps
    them as the whole image does."""

    class Twice(BlobNet):
        def forward(self, x):
            outputs = super().forward(x)
            for out in outputs:       # every blob again, a little lower scored: the model's own duplicate
                for key in ("boxes", "labels", "masks"):
                    out[key] = torch.cat([out[key], out[key]])
                out["scores"] = torch.cat([out["scores"], out["scores"] - 0.01])
            return outputs

    model = Twice()
    image = draw(200, 260, AWAY[:4])                # each inside one window only
    got = InstancePredictor(model, tile_above_pixels=4096, tile_size=(64, 80)).instances([image])[0]
    whole = InstancePredictor(model).instances([image])[0]
    assert len(whole) == len(got) == 8
    assert as_set(got) == as_set(whole)


def test_mask_nms_drops_the_lower_scored_of_overlapping_instances_from_different_windows():
    def piece(windows, label, score, top):
        mask = np.ones((10, 10), bool)
        return Piece(min(windows), label, score, [0.0, top, 10.0, top + 10.0], top, 0, encode(mask[None])[0],
                     set(windows))

    predictor = InstancePredictor(BlobNet())
    pieces = [piece({0, 1}, 0, 0.9, 0), piece({2}, 0, 0.8, 1),      # IoU 9/11: the second goes
              piece({3}, 0, 0.7, 30), piece({3}, 0, 0.6, 31),       # one window's: both stay
              piece({4}, 1, 0.5, 30)]                               # another class: stays
    kept = predictor._drop_duplicates(pieces, 50, 10)
    assert [p.score for p in kept] == [0.9, 0.7, 0.6, 0.5]


def test_same_size_images_go_through_together_and_match_one_at_a_time():
    model = BlobNet()
    predictor = InstancePredictor(model)
    images = [draw(40, 50, AWAY[:1], seed=1), draw(30, 30, [("circle", (15, 15, 6), 200, True)], seed=2),
              draw(40, 50, [("rect", (5, 5, 20, 25), 220, False)], seed=3)]
    model.calls.clear()
    batch = predictor.instances(images)
    assert sorted(model.calls) == [(1, 3, 30, 30), (2, 3, 40, 50)]
    for image, got in zip(images, batch, strict=True):
        assert as_set(got) == as_set(predictor.instances([image])[0])
        assert (got.height, got.width) == image.shape[:2]
    blank = draw(200, 260, [])
    assert len(predictor.instances([blank])[0]) == 0
    tiled = InstancePredictor(model, tile_above_pixels=4096, tile_size=(64, 80))
    assert len(tiled.instances([blank])[0]) == 0


def test_settings_come_from_the_model_and_flip_or_scales_are_refused():
    recorded = InferenceSettings(False, (1.0,), 5000, (100, 120), 0.3)
    model = BlobNet(ModelMeta(CLASSES, mean=MEAN, std=STD, inference=recorded))
    predictor = InstancePredictor.for_model(model, tile_overlap=None, score_threshold=0.4)
    assert predictor.settings() == recorded and predictor.score_threshold == 0.4
    assert InstancePredictor.for_model(model, tile_above_pixels=10).tile_above_pixels == 10
    with pytest.raises(ValueError, match="flip_tta: flip test-time augmentation is not defined for instance"):
        InstancePredictor.for_model(model, flip_tta=True)
    with pytest.raises(ValueError, match=r"scales: multi-scale prediction \(0.5, 1\) is not defined"):
        InstancePredictor.for_model(model, scales=(0.5, 1.0))
    flips = InferenceSettings(True, (1.0,), 1, (8, 8), 0.2)
    flipped = BlobNet(ModelMeta(CLASSES, mean=MEAN, std=STD, inference=flips))
    with pytest.raises(ValueError, match="flip_tta"):
        InstancePredictor.for_model(flipped)
    with pytest.raises(ValueError, match="tile_overlap"):
        InstancePredictor(model, tile_overlap=0.0)
    with pytest.raises(ValueError, match="uint8"):
        InstancePredictor(model).instances([np.zeros((4, 4, 3), np.float32)])


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    sys.path.insert(0, {root!r})
    from tests.inference.test_instances import BlobNet, draw
    from pipeline.inference.instances import InstancePredictor
    torch.set_num_threads(1)
    side, step = {side}, {step}
    blobs = [("rect", (x, y, x + 3 * step // 4, y + 3 * step // 4), 150 + (x * 7 + y * 13) % 100, False)
             for y in range(0, side - step, step) for x in range(0, side - step, step)]
    image = draw(side, side, blobs)
    model = BlobNet()
    predictor = InstancePredictor(model, tile_above_pixels=65536, tile_size=(256, 256), tile_overlap=0.25)
    predictor.instances([draw(300, 300, blobs[:2])])          # warm up torch's allocator and threads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = predictor.instances([image])[0]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert max(c[2] * c[3] for c in model.calls) <= 256 * 256, model.calls
    print(len(blobs), len(got), (after - before) / 1024)
""")


def test_a_tiled_prediction_holds_a_tile_not_an_image_per_instance():
    """Peak RSS added by one tiled 2000 x 2000 prediction of 324 objects, many cut by tile
    borders, in a fresh process: an image-sized bool mask per instance would be 4 MB each
    (1.3 GB), a float one 16 MB; one window's output here is a few MB."""
    side, step = 2000, 110
    script = RSS_SCRIPT.format(root=str(ROOT), side=side, step=step)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    blobs, found, added_mb = out.stdout.split()
    assert int(found) == int(blobs)                      # every object once, cut or not
    assert float(added_mb) < 100, f"{float(added_mb):.0f} MB added"


class SoftBlobNet(BlobNet):
    """BlobNet whose masks are too large by 4 pixels and soft at their edge, as a coarse mask
    head gives them (a blurred dilation of each blob)."""

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = super().forward(x)
        for one in out:
            grown = [cv2.dilate((m[0] > 0.5).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(np.float32)
                     for m in one["masks"].numpy()]
            soft = [cv2.GaussianBlur(g, (0, 0), 4)[None] for g in grown]
            one["masks"] = torch.tensor(np.array(soft, np.float32).reshape(one["masks"].shape))
        return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_grabcut_refines_each_instances_mask_with_the_image():
    from pipeline.models.base import Refinement

    image = draw(96, 128, [("circle", (30, 40, 14), 200, False), ("rect", (70, 20, 110, 60), 160, True)])
    truth = InstancePredictor(BlobNet()).instances([image])[0]
    soft = InstancePredictor(SoftBlobNet()).instances([image])[0]
    cut = Refinement("grabcut", {"iterations": 5, "sure": 0.9, "margin": 8})
    refined = InstancePredictor(SoftBlobNet(), postprocess=cut).instances([image])[0]
    assert len(truth) == len(soft) == len(refined) == 2
    assert refined.scores == soft.scores and refined.boxes == soft.boxes and refined.classes == soft.classes
    for t, s, r in zip(decoded(truth), decoded(soft), decoded(refined), strict=True):
        assert mask_iou(s, t) < 0.8 and mask_iou(r, t) > 0.95


def test_an_instance_model_takes_grabcut_only_and_on_whole_images():
    from pipeline.inference.refine import RefineError
    from pipeline.models.base import Refinement

    with pytest.raises(ValueError, match="postprocess: crf refines class probabilities, which instance "
                                         "segmentation does not predict; set postprocess to none, grabcut"):
        InstancePredictor(BlobNet(), postprocess=Refinement("crf"))
    cut = Refinement("grabcut", {"iterations": 1, "sure": 0.9, "margin": 8})
    tiled = InstancePredictor(BlobNet(), postprocess=cut, tile_above_pixels=4096, tile_size=(64, 80))
    with pytest.raises(RefineError, match=r"refines images of at most tile_above_pixels \(4,096\) pixels"):
        tiled.instances([draw(96, 128, [])])
