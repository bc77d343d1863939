"""Pictures of panoptic labellings (pipeline.viz.panoptic): shades of a class colour, stuff in
its class colour, each thing in its own shade with an outline, void untouched, the panel."""

import cv2
import numpy as np
import pytest

from pipeline.metrics.panoptic_types import Panoptic, Segment
from pipeline.viz.panoptic import overlay, panel, segment_colours, shades

PALETTE = [(128, 64, 128), (70, 130, 180), (200, 40, 40)]      # road, sky, car
ISTHING = [False, False, True]
ROAD, SKY, CAR = range(3)


def blended(image_rgb, colour, alpha=0.5) -> np.ndarray:
    return (np.asarray(image_rgb, float) * (1 - alpha) + np.asarray(colour, float) * alpha)


def scene() -> tuple[np.ndarray, Panoptic]:
    """A 60 x 80 grey image: sky above, road below, two touching cars on the road, a void strip."""
    ids = np.zeros((60, 80), np.int32)
    ids[:20] = 1                 # sky
    ids[20:56] = 2               # road; rows 56-59 void
    ids[30:50, 10:30] = 3        # car, the higher score
    ids[30:50, 30:50] = 4        # car, touching the first
    segments = [Segment(1, SKY), Segment(2, ROAD), Segment(3, CAR, score=0.9), Segment(4, CAR, score=0.8)]
    return np.full((60, 80, 3), 100, np.uint8), Panoptic(ids, segments)


def test_shades_start_at_the_colour_keep_its_hue_and_neighbours_differ():
    table = shades(PALETTE[CAR], 12)
    assert table.shape == (12, 3) and table.dtype == np.uint8
    np.testing.assert_array_equal(table[0], PALETTE[CAR])
    assert len({tuple(c) for c in table}) == 12
    assert np.abs(np.diff(table.astype(int), axis=0)).sum(1).min() > 60
    hue = cv2.cvtColor(table[None], cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
    assert np.abs(hue - hue[0]).max() <= 2


def test_stuff_takes_its_class_colour_and_things_their_own_shades():
    _, pan = scene()
    colours = segment_colours(pan, PALETTE, ISTHING)
    np.testing.assert_array_equal(colours[1], PALETTE[SKY])
    np.testing.assert_array_equal(colours[2], PALETTE[ROAD])
    np.testing.assert_array_equal(colours[3], shades(PALETTE[CAR], 2)[0])
    np.testing.assert_array_equal(colours[4], shades(PALETTE[CAR], 2)[1])


def test_overlay_blends_fills_outlines_things_only_and_leaves_void_alone():
    image, pan = scene()
    out = overlay(image, pan, PALETTE, ISTHING, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    car = shades(PALETTE[CAR], 2)
    np.testing.assert_allclose(out[10, 40], blended(100, PALETTE[SKY]), atol=1)
    np.testing.assert_allclose(out[25, 70], blended(100, PALETTE[ROAD]), atol=1)
    np.testing.assert_allclose(out[40, 20], blended(100, car[0]), atol=1)        # inside the first car
    np.testing.assert_allclose(out[40, 40], blended(100, car[1]), atol=1)        # inside the second
    np.testing.assert_array_equal(out[30, 20], car[0])         # the first car's top edge: its outline
    np.testing.assert_array_equal(out[40, 29], car[0])         # where the cars touch, each is outlined
    np.testing.assert_array_equal(out[40, 30], car[1])
    np.testing.assert_allclose(out[19, 40], blended(100, PALETTE[SKY]), atol=1)  # sky meets road: no line
    np.testing.assert_allclose(out[55, 40], blended(100, PALETTE[ROAD]), atol=1)
    np.testing.assert_array_equal(out[57:], image[57:])        # void: untouched
    np.testing.assert_array_equal(overlay(image, Panoptic(np.zeros((60, 80), np.int32)), PALETTE, ISTHING),
                                  image)


def test_panel_is_image_truth_and_prediction_side_by_side():
    image, truth = scene()
    predicted = Panoptic(truth.ids.copy(), truth.segments[:3])       # the second car missed: void
    predicted.ids[predicted.ids == 4] = 0
    picture = panel(image, truth, predicted, PALETTE, ISTHING, title="0001")
    assert picture.shape == (24 + 60, 3 * 80 + 2 * 4, 3)
    np.testing.assert_array_equal(picture[24:, :80], image)
    np.testing.assert_array_equal(picture[24:, 84:164], overlay(image, truth, PALETTE, ISTHING))
    np.testing.assert_array_equal(picture[24:, 168:], overlay(image, predicted, PALETTE, ISTHING))


def test_bad_input_names_what_was_expected():
    image, pan = scene()
    with pytest.raises(ValueError, match="a panoptic labelling of 60x80 for a 30x80 image"):
        overlay(image[:30], pan, PALETTE, ISTHING)
    with pytest.raises(ValueError, match="segment 3 has class 2; the palette has 2 colours"):
        overlay(image, pan, PALETTE[:2], ISTHING)
