"""Instance scores: RLE IoU, the DSB 2018 score by hand, COCO mask/box AP against
torchmetrics' MeanAveragePrecision and against cases whose AP is known."""

import numpy as np
import pytest
import torch

from pipeline.metrics.instance import Instances, coco_ap, dsb_image_score, dsb_score, encode, mask_iou

H, W = 64, 80


def square(y, x, size, h=H, w=W) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y:y + size, x:x + size] = True
    return mask


def instances(masks, classes=None, scores=None, iscrowd=None) -> Instances:
    masks = np.asarray(masks, bool).reshape(-1, H, W)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return Instances(H, W, classes=list(classes or [0] * len(masks)), boxes=boxes, masks=encode(masks),
                     scores=list(scores or []), iscrowd=list(iscrowd or []))


def test_rle_iou_is_the_pixel_iou():
    a, b = square(0, 0, 10), square(5, 5, 10)
    iou = mask_iou(encode(np.stack([a])), encode(np.stack([a, b])))
    want = (a & b).sum() / (a | b).sum()
    np.testing.assert_allclose(iou, [[1.0], [want]])


def test_dsb_score_by_hand():
    """Two nuclei; one found exactly, one by a mask of IoU 0.64 (8x8 inside 10x10), and one
    false positive: TP 2 below the threshold 0.64, 1 above, with FP 1 throughout."""
    truth = instances([square(0, 0, 10), square(30, 30, 10)])
    inner = square(31, 31, 8)
    predicted = instances([square(0, 0, 10), inner, square(50, 60, 6)], scores=[0.9, 0.8, 0.7])
    iou = 64 / 100
    per_threshold = [(2 if t < iou else 1) / (2 + 3 - (2 if t < iou else 1))
                     for t in np.round(np.arange(0.5, 0.951, 0.05), 2)]
    assert dsb_image_score(truth, predicted) == pytest.approx(np.mean(per_threshold))
    assert dsb_image_score(truth, instances(np.zeros((0, H, W)))) == 0.0
    assert dsb_image_score(instances(np.zeros((0, H, W))), instances(np.zeros((0, H, W)))) == 1.0
    assert dsb_score([truth, truth], [predicted, truth]) == pytest.approx((np.mean(per_threshold) + 1) / 2)


def test_dsb_matches_one_to_one():
    """Two predictions covering the same nucleus: one TP, one FP, never two TPs."""
    truth = instances([square(0, 0, 10)])
    predicted = instances([square(0, 0, 10), square(0, 0, 10)], scores=[0.9, 0.8])
    assert dsb_image_score(truth, predicted) == pytest.approx(1 / 2)


def random_split(rng, n_images=6, n_classes=3):
    truth, predicted = [], []
    for _ in range(n_images):
        masks, classes, p_masks, p_classes, p_scores = [], [], [], [], []
        for _ in range(rng.integers(1, 6)):
            size = int(rng.integers(4, 45))        # small (< 32 x 32) and medium objects
            y, x = int(rng.integers(0, H - size)), int(rng.integers(0, W - size))
            c = int(rng.integers(0, n_classes))
            masks.append(square(y, x, size))
            classes.append(c)
            if rng.random() < 0.8:          # found, roughly where it is
                dy, dx = rng.integers(-3, 4, 2)
                p_masks.append(square(max(0, y + dy), max(0, x + dx), size))
                p_classes.append(c if rng.random() < 0.85 else (c + 1) % n_classes)
                p_scores.append(float(rng.random()))
        for _ in range(rng.integers(0, 3)):   # false positives
            size = int(rng.integers(4, 20))
            p_masks.append(square(int(rng.integers(0, H - size)), int(rng.integers(0, W - size)), size))
            p_classes.append(int(rng.integers(0, n_classes)))
            p_scores.append(float(rng.random()))
        truth.append(instances(masks, classes))
        predicted.append(instances(p_masks if p_masks else np.zeros((0, H, W)), p_classes, p_scores))
    return truth, predicted


def torchmetrics_ap(truth, predicted, iou_type):
    from torchmetrics.detection import MeanAveragePrecision

    # COCO's threshold grids exactly: torchmetrics' defaults are float32 (0.3100000024 ...), and
    # a recall that falls exactly on a grid point then reads another precision (AP 0.1294, not 0.1301).
    metric = MeanAveragePrecision(iou_type=iou_type, class_metrics=True, backend="pycocotools",
                                  iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
                                  rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())

    def tensors(inst, masks, scores):
        out = {"labels": torch.tensor(inst.classes, dtype=torch.int64),
               "boxes": torch.tensor(inst.boxes, dtype=torch.float32).reshape(-1, 4),
               "masks": torch.from_numpy(np.asarray(masks, bool).reshape(-1, H, W))}
        if scores:
            out["scores"] = torch.tensor(inst.scores, dtype=torch.float32)
        return out

    from pycocotools import mask as rle

    def decode(inst):
        if not len(inst):
            return np.zeros((0, H, W))
        return np.stack([rle.decode({"size": m["size"], "counts": m["counts"].encode()}) for m in inst.masks])

    metric.update([tensors(p, decode(p), True) for p in predicted],
                  [tensors(t, decode(t), False) for t in truth])
    return metric.compute()


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_coco_ap_agrees_with_torchmetrics(iou_type):
    truth, predicted = random_split(np.random.default_rng(0))
    ours = coco_ap(truth, predicted, ["a", "b", "c"], iou_type=iou_type, max_detections=100)
    theirs = torchmetrics_ap(truth, predicted, iou_type)
    assert 0.05 < ours["ap"] < 0.95                     # neither trivial nor perfect
    assert ours["ap_small"] is not None and ours["ap_medium"] is not None and ours["ap_large"] is None
    for key, name in (("ap", "map"), ("ap50", "map_50"), ("ap75", "map_75"), ("ap_small", "map_small"),
                      ("ap_medium", "map_medium"), ("ap_large", "map_large")):
        mine = -1.0 if ours[key] is None else ours[key]         # torchmetrics: -1 where nothing to score
        assert mine == pytest.approx(float(theirs[name]), abs=1e-6), key
    for k, name in enumerate(["a", "b", "c"]):
        assert ours["per_class"][name] == pytest.approx(float(theirs["map_per_class"][k]), abs=1e-6)


def test_perfect_predictions_score_one_even_with_hundreds_of_objects():
    """150 objects in one image: pycocotools' summary would read AP at 100 detections."""
    masks = [square(8 * (k // 10), 8 * (k % 10), 6, h=128, w=160) for k in range(150)]
    masks = np.stack(masks)
    inst = Instances(128, 160, classes=[0] * 150, masks=encode(masks), scores=[1.0] * 150,
                     boxes=[[8.0 * (k % 10), 8.0 * (k // 10), 8.0 * (k % 10) + 6, 8.0 * (k // 10) + 6]
                            for k in range(150)])
    result = coco_ap([inst], [inst], ["nucleus"], max_detections=300)
    assert result["ap"] == pytest.approx(1.0) and result["ap_small"] == pytest.approx(1.0)
    assert result["ap_large"] is None                   # no large object to find
    capped = coco_ap([inst], [inst], ["nucleus"], max_detections=100)
    assert capped["ap"] < 0.7                           # two thirds found at most


def test_no_predictions_score_zero_where_there_is_something_to_find():
    truth = [instances([square(0, 0, 10)], classes=[1])]
    result = coco_ap(truth, [instances(np.zeros((0, H, W)))], ["a", "b"])
    assert result["ap"] == 0.0 and result["ap_small"] == 0.0 and result["ap_medium"] is None
    assert result["per_class"] == {"a": None, "b": 0.0}


def test_precision_recall_curve():
    """Two objects, one found (score 0.9) and one false positive (0.8): precision 1 up to
    recall 0.5 and nothing beyond; a perfect split has precision 1 everywhere."""
    truth = [instances([square(0, 0, 10), square(30, 30, 12)])]
    found = instances([square(0, 0, 10), square(50, 60, 8)], scores=[0.9, 0.8])
    curve = coco_ap(truth, [found], ["a"])["pr_curve"]
    assert len(curve["recall"]) == 101 and curve["recall"][50] == 0.5
    assert curve["0.50"][:51] == [1.0] * 51 and curve["0.50"][51:] == [0.0] * 50
    perfect = coco_ap(truth, [instances([square(0, 0, 10), square(30, 30, 12)], scores=[1, 1])], ["a"])
    assert perfect["pr_curve"]["0.50:0.95"] == [1.0] * 101
    empty = coco_ap(truth, [instances(np.zeros((0, H, W)))], ["a"])["pr_curve"]
    assert empty["0.50"] == [0.0] * 101


def test_pycocotools_prints_nothing_even_through_a_patched_print(monkeypatch):
    """Ray Train replaces the built-in print in its workers with one that logs every line
    (redirecting stdout does not silence it): pycocotools' progress chatter must not reach it."""
    import builtins

    printed = []
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: printed.append(args))
    truth = [instances([square(0, 0, 10)])]
    coco_ap(truth, [instances([square(0, 0, 10)], scores=[1.0])], ["a"])
    assert printed == []


def test_the_dsb_score_counts_the_answers_not_the_low_confidence_guesses():
    """AP ranks predictions by score; the DSB score takes those scoring at least min_score."""
    truth = [instances([square(0, 0, 10), square(30, 30, 12)])]
    guesses = instances([square(0, 0, 10), square(30, 30, 12), square(50, 60, 8)], scores=[0.9, 0.8, 0.1])
    assert dsb_score(truth, [guesses]) == pytest.approx(1.0)                  # default: 0.5
    assert dsb_score(truth, [guesses], min_score=0.0) == pytest.approx(2 / 3)
    assert len(guesses.above(0.85)) == 1 and guesses.above(0.85).scores == [0.9]
