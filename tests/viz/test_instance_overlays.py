"""Pictures of instances (pipeline.viz.instances): distinct colours, the instance-id image
painted from RLE runs, and the overlay's fills, outlines and labels."""

import numpy as np
import pytest
from pycocotools import mask as rle

from pipeline.metrics.instance import Instances, encode
from pipeline.viz.instances import colours, instance_ids, overlay


def squares(h: int, w: int, rects: list[tuple[int, int, int, int]], scores: list[float]) -> Instances:
    """Instances that are filled rectangles (x0, y0, x1, y1), in the order given."""
    masks = np.zeros((len(rects), h, w), bool)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = True
    return Instances(h, w, [k % 2 for k in range(len(rects))], [list(map(float, r)) for r in rects],
                     encode(masks), scores)


def test_colours_are_distinct_and_neighbours_far_apart():
    table = colours(64).astype(int)
    assert table.shape == (64, 3) and len({tuple(c) for c in table}) == 64
    assert np.abs(np.diff(table, axis=0)).sum(1).min() > 60         # consecutive instances never look alike


def test_instance_ids_match_painting_decoded_masks_with_the_earlier_winning():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    masks = rng.random((12, h, w)) < 0.15
    scores = list(np.linspace(1, 0.1, 12))
    inst = Instances(h, w, [0] * 12, [[0.0, 0.0, 1.0, 1.0]] * 12, encode(masks), scores)
    expected = np.zeros((h, w), np.int64)
    for k in reversed(range(12)):
        mask = rle.decode({"size": [h, w], "counts": inst.masks[k]["counts"].encode()}).astype(bool)
        expected[mask] = k + 1
    ids = instance_ids(inst)
    assert ids.dtype == np.uint16 and ids.shape == (h, w) and ids.flags.c_contiguous
    np.testing.assert_array_equal(ids, expected)
    assert not instance_ids(Instances(5, 4)).any()


def test_overlay_fills_outlines_and_labels_each_instance_in_its_own_colour():
    image = np.full((120, 160, 3), 100, np.uint8)
    inst = squares(120, 160, [(20, 40, 60, 100), (90, 50, 150, 110), (50, 60, 100, 90)], [0.9, 0.8, 0.4])
    out = overlay(image, inst, ["cell", "red cell"], alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    table = colours(3)
    inner = [out[70, 40], out[100, 120]]          # deep inside the first and the second instance
    for pixel, colour in zip(inner, table[:2], strict=True):
        np.testing.assert_allclose(pixel.astype(int), (image[0, 0].astype(int) + colour) / 2, atol=1)
    assert not np.array_equal(inner[0], inner[1])
    np.testing.assert_array_equal(out[70, 20], table[0])     # the first's left edge: its outline
    np.testing.assert_array_equal(out[115, 5], image[0, 0])   # no instance, no label: untouched
    # Where the first and the third overlap, the first (higher score) shows.
    np.testing.assert_array_equal(out[75, 55], inner[0])
    # A label "cell 0.90" sits above the first's box: the strip above y = 40 changed.
    assert (out[25:40, 20:60] != image[25:40, 20:60]).any(axis=2).sum() > 50
    assert not (out[25:40, 20:60] != image[25:40, 20:60]).any(axis=2).all()      # text, not a block
    # Fills alone: alpha 0 leaves the inside of an instance as it was.
    plain = overlay(image, inst, ["cell", "red cell"], alpha=0.0)
    np.testing.assert_array_equal(plain[70, 40], image[70, 40])


def test_overlay_label_cap_no_instances_and_a_size_mismatch():
    image = np.zeros((60, 60, 3), np.uint8)
    inst = squares(60, 60, [(30, 30, 50, 50)], [0.7])
    unlabelled = overlay(image, inst, ["cell"], max_labels=0)
    assert not unlabelled[:30].any()                          # nothing drawn above the box
    assert overlay(image, inst, ["cell"])[:30].any()
    empty = Instances(60, 60)
    np.testing.assert_array_equal(overlay(image, empty, ["cell"]), image)
    assert colours(0).shape == (0, 3)
    with pytest.raises(ValueError, match="60x60"):
        overlay(np.zeros((50, 60, 3), np.uint8), inst, ["cell"])
