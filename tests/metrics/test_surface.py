"""HD95 and average symmetric surface distance per class (``pipeline.metrics.surface``)."""

import math

import numpy as np
import pytest
from scipy import ndimage

from pipeline.metrics.surface import SurfaceDistances

IGNORE = 255


def square(shift: int = 0, size: int = 30) -> np.ndarray:
    """(size, size) class 0 with a 10 x 10 square of class 1 at rows 5-14, columns 5+shift..14+shift."""
    mask = np.zeros((size, size), np.uint8)
    mask[5:15, 5 + shift:15 + shift] = 1
    return mask


def surface_points(region: np.ndarray) -> np.ndarray:
    return np.argwhere(region & ~ndimage.binary_erosion(region))


def brute_asd(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean distance between the outlines of two regions, by brute force."""
    pa, pb = surface_points(a), surface_points(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return (d.min(1).sum() + d.min(0).sum()) / (len(pa) + len(pb))


def test_identical_masks_are_zero_apart():
    metric = SurfaceDistances(2, IGNORE)
    metric.update(square(), square())
    out = metric.compute()
    assert out["hd95"] == [0.0, 0.0] and out["asd"] == [0.0, 0.0] and out["unmatched"] == [0, 0]


def test_a_square_moved_three_pixels_is_three_apart_at_the_95th_percentile():
    metric = SurfaceDistances(2, IGNORE)
    metric.update(square(shift=3), square())
    out = metric.compute()
    assert out["hd95"][1] == pytest.approx(3.0)
    assert out["asd"][1] == pytest.approx(brute_asd(square(3) == 1, square() == 1), rel=1e-5)
    assert 0 < out["asd"][1] < 3


def test_a_class_in_only_one_map_has_no_distance_and_is_counted_unmatched():
    metric = SurfaceDistances(3, IGNORE)
    truth = square()
    truth[20:25, 20:25] = 2                         # class 2 missed by the prediction
    metric.update(square(), truth)
    out = metric.compute()
    assert out["unmatched"] == [0, 0, 1] and math.isnan(out["hd95"][2]) and math.isnan(out["asd"][2])
    assert out["hd95"][1] == 0.0


def test_ignored_pixels_do_not_count_and_the_split_figure_is_the_mean_over_images():
    truth = square()
    truth[:, 22:] = IGNORE                          # a void band
    metric = SurfaceDistances(2, IGNORE)
    pred = square(shift=3)
    pred[:, 22:] = np.random.default_rng(0).integers(0, 2, (30, 8))   # anything there
    metric.update(pred, truth)
    alone = metric.compute()["asd"][1]
    metric.update(square(), square())               # a second image, perfect
    assert metric.compute()["asd"][1] == pytest.approx(alone / 2)
    clean = SurfaceDistances(2, IGNORE)
    clean.update(square(shift=3), truth)
    assert clean.compute()["asd"][1] == alone
