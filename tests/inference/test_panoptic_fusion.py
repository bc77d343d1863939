"""The panoptic fusion step (pipeline.inference.panoptic_fusion): instances by score with
overlap removal, things over stuff, small stuff regions left void, deterministic ids."""

import numpy as np
import pytest
from pycocotools import mask as rle

from pipeline.inference.panoptic_fusion import DEFAULT_STUFF_MIN_AREA, fuse
from pipeline.metrics.instance import Instances, encode
from pipeline.metrics.panoptic_types import Segment

# Classes: 0 road, 1 sky (stuff), 2 car, 3 person (things); 255 unlabelled.
ISTHING = [False, False, True, True]
ROAD, SKY, CAR, PERSON = range(4)


def boxes_instances(h: int, w: int, items: list[tuple[int, float, tuple[int, int, int, int]]]) -> Instances:
    """Instances that are filled rectangles: (class, score, (x0, y0, x1, y1)) each."""
    masks = np.zeros((len(items), h, w), bool)
    for k, (_, _, (x0, y0, x1, y1)) in enumerate(items):
        masks[k, y0:y1, x0:x1] = True
    return Instances(h, w, [c for c, _, _ in items], [list(map(float, b)) for _, _, b in items],
                     encode(masks), [s for _, s, _ in items])


def test_instances_by_score_with_overlap_removal_then_stuff_on_the_free_pixels():
    h, w = 10, 12
    semantic = np.full((h, w), ROAD, np.int64)
    semantic[:4] = SKY
    semantic[9, :] = 255                       # unlabelled: stays void
    semantic[8, :3] = -1                       # the semantic head's "thing" channel: not stuff
    semantic[8, 3:6] = CAR                     # a thing class in the semantic map: not stuff
    items = [
        (PERSON, 0.8, (4, 2, 8, 6)),    # 16 px; 4 of them (x 4-5, y 4-5) the car's: 25% taken -> pasted
        (CAR, 0.3, (0, 0, 2, 2)),       # below min_score: dropped
        (CAR, 0.9, (0, 4, 6, 8)),       # 24 px, the best: pasted whole
        (CAR, 0.7, (1, 4, 5, 8)),       # 16 px, all the first car's: 100% taken -> dropped
    ]
    out = fuse(boxes_instances(h, w, items), semantic, ISTHING, stuff_min_area=1)
    assert out.ids.dtype == np.int32 and out.ids.shape == (h, w)
    # Ids in the order made: car 0.9, person 0.8, then road and sky by class index.
    assert out.segments == [Segment(1, CAR, score=0.9), Segment(2, PERSON, score=0.8),
                            Segment(3, ROAD), Segment(4, SKY)]
    expected = np.where(semantic == SKY, 4, np.where(semantic == ROAD, 3, 0))
    expected[2:6, 4:8] = 2
    expected[4:8, 0:6] = 1                     # the car wins the 4 pixels it shares with the person
    np.testing.assert_array_equal(out.ids, expected)
    assert (out.ids[8, :6] == 0).all() and (out.ids[9] == 0).all()


def test_overlap_threshold_is_the_share_of_the_mask_already_taken():
    h, w = 6, 8
    semantic = np.zeros((h, w), np.int64)
    # The second car: 8 px, 4 taken by the first = 50%: kept at threshold 0.5 (not above it),
    # dropped at 0.49.
    items = [(CAR, 0.9, (0, 0, 4, 2)), (CAR, 0.8, (2, 0, 6, 2))]
    kept = fuse(boxes_instances(h, w, items), semantic, ISTHING, overlap_threshold=0.5, stuff_min_area=0)
    assert [s.id for s in kept.segments if s.category == CAR] == [1, 2]
    assert np.count_nonzero(kept.ids == 2) == 4
    dropped = fuse(boxes_instances(h, w, items), semantic, ISTHING, overlap_threshold=0.49, stuff_min_area=0)
    assert [s.category for s in dropped.segments] == [CAR, ROAD]
    # An empty mask takes no id.
    empty = fuse(boxes_instances(h, w, [(PERSON, 0.95, (0, 0, 0, 0)), *items]), semantic, ISTHING,
                 stuff_min_area=0)
    assert [s.category for s in empty.segments] == [CAR, CAR, ROAD]


def test_stuff_below_the_minimum_area_stays_void_and_the_default_keeps_256_pixels():
    h, w = 40, 40
    semantic = np.full((h, w), ROAD, np.int64)
    semantic[:16, :16] = SKY                                   # exactly 256 px of sky
    out = fuse(Instances(h, w), semantic, ISTHING)
    assert DEFAULT_STUFF_MIN_AREA == 256
    assert [s.category for s in out.segments] == [ROAD, SKY]
    semantic[0, 0] = ROAD                                      # 255 px of sky: below the minimum
    out = fuse(Instances(h, w), semantic, ISTHING)
    assert [s.category for s in out.segments] == [ROAD]
    assert (out.ids[:16, :16] == 0).sum() == 255 and out.ids[0, 0] == 1
    # Only the free pixels count: a car covering most of the sky leaves too little of it.
    semantic[0, 0] = SKY
    car = boxes_instances(h, w, [(CAR, 0.9, (0, 0, 8, 16))])
    out = fuse(car, semantic, ISTHING)
    assert [s.category for s in out.segments] == [CAR, ROAD]


def test_a_semantic_map_alone_becomes_stuff_segments_that_read_back_as_it():
    rng = np.random.default_rng(0)
    semantic = rng.integers(0, 2, (30, 40))
    out = fuse(Instances(30, 40), semantic, ISTHING, stuff_min_area=0)
    np.testing.assert_array_equal(out.semantic(255), semantic)


def test_matches_painting_decoded_masks_whatever_the_order_given():
    rng = np.random.default_rng(1)
    h, w, n = 37, 53, 15
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.4, (n, 1, 1))
    scores = rng.permutation(np.linspace(0.2, 1.0, n)).tolist()
    classes = rng.choice([CAR, PERSON], n).tolist()
    inst = Instances(h, w, classes, [[0.0, 0.0, 1.0, 1.0]] * n, encode(masks), scores)
    semantic = rng.integers(-1, 4, (h, w))
    out = fuse(inst, semantic, ISTHING, overlap_threshold=0.6, stuff_min_area=30)
    # The same steps on decoded masks.
    ids, made = np.zeros((h, w), np.int32), []
    for k in sorted(range(n), key=lambda k: -scores[k]):
        mask = rle.decode({"size": [h, w], "counts": inst.masks[k]["counts"].encode()}).astype(bool)
        if scores[k] < 0.5 or not mask.any():
            continue
        taken = np.count_nonzero(mask & (ids > 0)) / np.count_nonzero(mask)
        if taken > 0.6 or taken == 1.0:
            continue
        made.append((classes[k], scores[k]))
        ids[mask & (ids == 0)] = len(made)
    for c in (ROAD, SKY):
        region = (semantic == c) & (ids == 0)
        if region.sum() >= 30:
            made.append((c, None))
            ids[region] = len(made)
    np.testing.assert_array_equal(out.ids, ids)
    assert [(s.category, s.score) for s in out.segments] == made
    assert [s.id for s in out.segments] == list(range(1, len(made) + 1))
    shuffled = rng.permutation(n)
    again = Instances(h, w, [classes[k] for k in shuffled], inst.boxes, [inst.masks[k] for k in shuffled],
                      [scores[k] for k in shuffled])
    np.testing.assert_array_equal(fuse(again, semantic, ISTHING, overlap_threshold=0.6,
                                       stuff_min_area=30).ids, out.ids)


def test_of_two_equal_scores_the_one_given_first_is_pasted_first():
    semantic = np.zeros((6, 8), np.int64)
    items = [(PERSON, 0.7, (2, 0, 6, 4)), (CAR, 0.7, (0, 0, 4, 4))]
    out = fuse(boxes_instances(6, 8, items), semantic, ISTHING, stuff_min_area=0)
    assert [s.category for s in out.segments] == [PERSON, CAR, ROAD]
    assert out.ids[0, 3] == 1 and out.ids[0, 1] == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"semantic_shape": (9, 12)}, "semantic map of 9x12, instances of 10x12"),
    ({"value": 7}, r"semantic holds \[7\]: expected class indices 0..3, the void value 255"),
    ({"instance_class": ROAD}, r"instance 0 has class 0; instances must be of a thing class \[2, 3\]"),
    ({"unscored": True}, "1 instances with 0 scores"),
    ({"void": 1}, "void=1 is a class index"),
])
def test_bad_input_is_refused_with_what_was_expected(change, message):
    h, w = 10, 12
    semantic = np.zeros(change.get("semantic_shape", (h, w)), np.int64)
    semantic[0, 0] = change.get("value", 0)
    inst = boxes_instances(h, w, [(change.get("instance_class", CAR), 0.9, (0, 0, 3, 3))])
    if change.get("unscored"):
        inst.scores = []
    with pytest.raises(ValueError, match=message):
        fuse(inst, semantic, ISTHING, void=change.get("void", 255))
