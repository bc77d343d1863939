"""Panoptic quality (pipeline.metrics.panoptic): PQ / SQ / RQ against a hand-worked example
with things and stuff, void, a crowd region and a class absent from both; COCO's rules where
torchmetrics' differ; plain torchmetrics where they agree; the semantic view's mIoU; two ranks."""

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality

from pipeline.metrics.panoptic import PanopticMetric
from pipeline.metrics.panoptic_types import Panoptic, Segment
from tests.engine.test_engine import on_ranks

NAMES = ["road", "sky", "car", "person", "tree"]
ISTHING = [False, False, True, True, False]
ROAD, SKY, CAR, PERSON, TREE = range(5)


def art(rows: list[str], legend: dict[str, Segment]) -> Panoptic:
    """A ``Panoptic`` drawn with one letter per pixel: ``legend`` gives each letter's segment,
    '.' is void."""
    ids = np.array([[legend[ch].id if ch != "." else 0 for ch in row] for row in rows], np.int32)
    return Panoptic(ids, sorted({s.id: s for s in legend.values()}.values(), key=lambda s: s.id))


# Image 1, 8 x 10. Truth: sky (20 px), car A (8), void (4), a crowd of people C (8), road
# (36) and person B (4).
TRUTH_1 = art(["ssssssssss",
               "ssssssssss",
               "AAAA..CCCC",
               "AAAA..CCCC",
               "rrrrrrrrrr",
               "rrrrrrrrrr",
               "rrrrrrBBrr",
               "rrrrrrBBrr"],
              {"r": Segment(1, ROAD), "s": Segment(2, SKY), "A": Segment(3, CAR), "B": Segment(4, PERSON),
               "C": Segment(5, PERSON, iscrowd=True)})
# Prediction: sky on row 0 only (10 px); road on row 1, at A's left column and on all the
# true road (48 px); car a (8 px: 6 on A, 2 on void); person q (2 px, all on void);
# person p (6 px, all on the person crowd); car b (2 px, on the person crowd); B left void.
PRED_1 = art(["ssssssssss",
              "rrrrrrrrrr",
              "raaaaqpppb",
              "raaaaqpppb",
              "rrrrrrrrrr",
              "rrrrrrrrrr",
              "rrrrrr..rr",
              "rrrrrr..rr"],
             {"r": Segment(1, ROAD), "s": Segment(2, SKY), "a": Segment(3, CAR, score=0.9),
              "q": Segment(4, PERSON, score=0.8), "p": Segment(5, PERSON, score=0.7),
              "b": Segment(6, CAR, score=0.6)})
# Image 2, 4 x 4: road and person B, predicted exactly.
TRUTH_2 = art(["rrrr", "rrrr", "rBBr", "rBBr"], {"r": Segment(1, ROAD), "B": Segment(2, PERSON)})
PRED_2 = art(["rrrr", "rrrr", "rBBr", "rBBr"], {"r": Segment(7, ROAD), "B": Segment(9, PERSON, score=0.9)})

# Worked by hand. IoU = intersection / union; COCO leaves the prediction's pixels on truth
# void out of the union; a match needs IoU > 0.5.
#  image 1  road: road (48 px predicted) vs road (36 true): 36 / (48 + 36 - 36) = 0.75 -> TP
#           sky: 10 / (10 + 20 - 10) = 0.5, not above 0.5 -> FP 1 and FN 1
#           car: a vs A: 6 / (8 + 8 - 6 - 2 on void) = 0.75 -> TP; b lies on a crowd of
#                *people*, not of cars -> FP 1
#           person: q lies all on void, p all on the person crowd -> neither is an FP;
#                B is predicted void -> FN 1 (COCO; torchmetrics alone would not count it);
#                the crowd C is neither matched nor missed
#           tree: in neither -> left out of every mean
#  image 2  road: TP, IoU 1;  person: TP, IoU 1
#  summed   road   TP 2, IoU sum 1.75            SQ 0.875, RQ 1,               PQ 0.875
#           sky    TP 0, FP 1, FN 1              SQ 0,     RQ 0,               PQ 0
#           car    TP 1 (0.75), FP 1             SQ 0.75,  RQ 1 / 1.5 = 2/3,   PQ 0.5
#           person TP 1 (1.0), FN 1              SQ 1,     RQ 1 / 1.5 = 2/3,   PQ 2/3
#  all      PQ (0.875 + 0 + 0.5 + 2/3) / 4 = 0.510417, SQ 2.625 / 4 = 0.65625,
#           RQ (1 + 0 + 2/3 + 2/3) / 4 = 0.583333
#  things   PQ (0.5 + 2/3) / 2 = 0.583333, SQ 0.875, RQ 2/3
#  stuff    PQ 0.875 / 2 = 0.4375, SQ 0.4375, RQ 0.5
HAND = {"pq": 0.510417, "sq": 0.65625, "rq": 0.583333, "pq_things": 0.583333, "sq_things": 0.875,
        "rq_things": 0.666667, "pq_stuff": 0.4375, "sq_stuff": 0.4375, "rq_stuff": 0.5}
HAND_CLASSES = {"road": (0.875, 0.875, 1.0, 2, 0, 0), "sky": (0.0, 0.0, 0.0, 0, 1, 1),
                "car": (0.5, 0.75, 2 / 3, 1, 1, 0), "person": (2 / 3, 1.0, 2 / 3, 1, 0, 1)}
# The semantic view (void and crowd ignored; predicted void a wrong answer), rows = truth:
#   road 48 -> road;  sky 10 -> sky, 10 -> road;  car 6 -> car, 2 -> road;
#   person 4 -> person, 4 -> void
#   IoU road 48 / (48 + 12) = 0.8, sky 10 / 20 = 0.5, car 6 / 8 = 0.75, person 4 / 8 = 0.5,
#   tree NaN -> mIoU 2.55 / 4 = 0.6375; pixel accuracy 68 / 84
HAND_IOU = {"road": 0.8, "sky": 0.5, "car": 0.75, "person": 0.5, "tree": None}


def pairs(p: Panoptic) -> torch.Tensor:
    """torchmetrics' input: (1, H, W, 2) (class, segment id), void and unknown ids class -1."""
    return torch.from_numpy(np.stack([p.category_map(-1), p.ids], axis=-1))[None]


def hand_metric() -> PanopticMetric:
    metric = PanopticMetric(NAMES, ISTHING)
    metric.update([PRED_1], [TRUTH_1])
    metric.update([PRED_2], [TRUTH_2])
    return metric


def test_pq_sq_rq_match_the_hand_worked_example():
    out = hand_metric().all_reduce().compute()
    for key, value in HAND.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    for name, (pq, sq, rq, tp, fp, fn) in HAND_CLASSES.items():
        got = out["per_class"][name]
        assert (got["pq"], got["sq"], got["rq"]) == pytest.approx((pq, sq, rq)), name
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn), name
    assert out["per_class"]["tree"] == {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0,
                                        "iou": None}
    assert out["images"] == 2
    assert out["segments"] == {"truth": 6, "crowd": 1, "predicted": 8, "tp": 4, "fp": 2, "fn": 2}


def test_the_semantic_view_miou_counts_predicted_void_as_wrong_and_ignores_crowd():
    out = hand_metric().compute()
    assert out["miou"] == pytest.approx(0.6375)
    assert out["pixel_accuracy"] == pytest.approx(68 / 84)
    for name, iou in HAND_IOU.items():
        assert out["per_class"][name]["iou"] == pytest.approx(iou), name


def test_torchmetrics_alone_scores_the_example_otherwise():
    """Why the relabelling: plain torchmetrics, with predicted void and the crowd as its void,
    misses B (mostly predicted void) and excuses car b (on a crowd of another class)."""
    truth = Panoptic(TRUTH_1.ids, [s for s in TRUTH_1.segments if not s.iscrowd])
    plain = PanopticQuality(things={CAR, PERSON}, stuffs={ROAD, SKY, TREE}, allow_unknown_preds_category=True)
    plain.update(pairs(PRED_1), pairs(truth))
    assert plain.false_negatives.tolist()[1] == 0 and plain.false_positives.tolist()[0] == 0  # person, car
    ours = PanopticMetric(NAMES, ISTHING)
    ours.update([PRED_1], [TRUTH_1])
    assert ours.compute()["per_class"]["person"]["fn"] == 1 and ours.compute()["per_class"]["car"]["fp"] == 1


def test_crowd_pixels_stay_in_a_matched_union():
    # person B 6 px, a crowd of people 4 px; the prediction covers B and 2 crowd pixels:
    # COCO: 6 / (8 + 6 - 6) = 0.75 (were the crowd void, 6 / 6 = 1.0).
    truth = art(["BBBBBBCCCC"], {"B": Segment(1, PERSON), "C": Segment(2, PERSON, iscrowd=True)})
    pred = art(["pppppppp.."], {"p": Segment(1, PERSON, score=0.9)})
    metric = PanopticMetric(NAMES, ISTHING)
    metric.update([pred], [truth])
    person = metric.compute()["per_class"]["person"]
    assert (person["tp"], person["fp"], person["fn"]) == (1, 0, 0)
    assert person["sq"] == pytest.approx(0.75)


@pytest.mark.parametrize(("rows", "counts"), [
    # 10 px: 3 on void, 3 on the crowd (60% excusable), and a match with B: 4 / (10 + 4 - 4 - 3) = 0.57
    (["BBBB...CCC", "pppppppppp"], (1, 0, 0)),
    # 10 px: 3 on void, 3 on the crowd, 1 on B: no match (1 / (10 + 1 - 1 - 3)) -> excused, B missed
    (["BrrCCC...r", "pppppppppp"], (0, 0, 1)),
    # 10 px: 2 on void, 3 on the crowd, 5 on road: 50% excusable is not more than half -> an FP
    (["rrrrr..CCC", "pppppppppp"], (0, 1, 0)),
])
def test_a_crowd_excuses_only_unmatched_predictions_mostly_on_void_and_crowd(rows, counts):
    truth = art([rows[0]], {"B": Segment(1, PERSON), "C": Segment(2, PERSON, iscrowd=True),
                            "r": Segment(3, ROAD)})
    pred = art([rows[1]], {"p": Segment(1, PERSON, score=0.9)})
    metric = PanopticMetric(NAMES, ISTHING)
    metric.update([pred], [truth])
    person = metric.compute()["per_class"]["person"]
    assert (person["tp"], person["fp"], person["fn"]) == counts


def random_panoptic(rng: np.random.Generator, h: int, w: int) -> Panoptic:
    """Stuff bands with thing rectangles over them; every pixel a segment, no crowd."""
    cls = np.where(np.arange(h)[:, None] < h // 2, SKY, ROAD).repeat(w, axis=1)
    ids = np.where(cls == SKY, 1, 2).astype(np.int32)
    segments = [Segment(1, SKY), Segment(2, ROAD)]
    for k in range(rng.integers(1, 5)):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        ids[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = 3 + k
        segments.append(Segment(3 + k, int(rng.choice([CAR, PERSON])), score=0.9))
    present = set(np.unique(ids).tolist())
    return Panoptic(ids, [s for s in segments if s.id in present])


def test_without_void_or_crowd_it_is_plain_torchmetrics():
    rng = np.random.default_rng(0)
    truth = [random_panoptic(rng, 24, 32) for _ in range(6)]
    pred = [random_panoptic(rng, 24, 32) for _ in range(6)]
    ours = PanopticMetric(NAMES, ISTHING)
    ours.update(pred, truth)
    out = ours.compute()
    plain = PanopticQuality(things={CAR, PERSON}, stuffs={ROAD, SKY, TREE}, return_sq_and_rq=True)
    for p, t in zip(pred, truth, strict=True):
        plain.update(pairs(p), pairs(t))
    np.testing.assert_allclose([out["pq"], out["sq"], out["rq"]], plain.compute().tolist())


def _hand_on_rank(rank: int) -> dict:
    metric = PanopticMetric(NAMES, ISTHING)
    metric.update(*([[PRED_1], [TRUTH_1]], [[PRED_2], [TRUTH_2]])[rank])
    return metric.all_reduce().compute()


def test_all_reduce_sums_two_ranks_into_the_split_score(tmp_path):
    results = on_ranks(_hand_on_rank, 2, tmp_path)
    expected = hand_metric().compute()
    for rank in (0, 1):
        assert results[rank]["segments"] == expected["segments"]
        for key in (*HAND, "miou"):
            assert results[rank][key] == pytest.approx(expected[key]), key


@pytest.mark.parametrize(("pred", "truth", "message"), [
    (PRED_1, TRUTH_2, "a prediction of 8x10 for a true image of 4x4"),
    (Panoptic(PRED_2.ids, [Segment(7, 5), Segment(9, PERSON)]), TRUTH_2,
     r"prediction segment 7 has class 5; expected 0..4 \(5 classes\)"),
])
def test_bad_input_is_refused_naming_what_was_expected(pred, truth, message):
    with pytest.raises(ValueError, match=message):
        PanopticMetric(NAMES, ISTHING).update([pred], [truth])


def test_nothing_scored_is_an_error_and_ignore_index_is_no_class():
    with pytest.raises(ValueError, match="no validation images were scored"):
        PanopticMetric(NAMES, ISTHING).compute()
    with pytest.raises(ValueError, match="ignore_index=3 is a class index"):
        PanopticMetric(NAMES, ISTHING, ignore_index=3)


def test_an_images_own_pq_is_that_of_a_metric_given_it_alone():
    rng = np.random.default_rng(7)
    split = PanopticMetric(["a", "b", "c"], [False, True, True])
    for _ in range(4):
        truth, predicted = (_random_panoptic(rng) for _ in range(2))
        alone = PanopticMetric(["a", "b", "c"], [False, True, True])
        alone.update([predicted], [truth])
        assert split.update_image(predicted, truth) == pytest.approx(alone.compute()["pq"], abs=1e-12)


def _random_panoptic(rng) -> Panoptic:
    """Stuff class 0 under up to three squares of thing classes 1 and 2, some cut by others."""
    ids = np.ones((24, 32), np.int32)
    segments = [Segment(1, 0)]
    for k in range(int(rng.integers(1, 4))):
        y, x, side = int(rng.integers(0, 16)), int(rng.integers(0, 24)), int(rng.integers(4, 9))
        ids[y:y + side, x:x + side] = k + 2
        segments.append(Segment(k + 2, int(rng.integers(1, 3))))
    present = set(np.unique(ids).tolist())
    return Panoptic(ids, [s for s in segments if s.id in present])
