"""Refinement with the image (``pipeline.inference.refine``): the dense CRF, against pydensecrf's own
and on noisy probabilities; GrabCut seeded from probabilities, against OpenCV's own."""

import cv2
import numpy as np
import pytest

from pipeline.inference.refine import RefineError, dense_crf, grabcut, grabcut_seeds


def scene(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy red disc on a noisy green-grey background: (RGB image, true disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    image = np.where(disc[..., None], [200, 40, 40], [60, 140, 90]).astype(float)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def blurry_guess(disc: np.ndarray, grow: int = 4) -> np.ndarray:
    """A model's probabilities: a disc too large by ``grow`` pixels, soft at its edge (sure only
    inside the disc)."""
    grown = cv2.dilate(disc.astype(np.uint8), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    return cv2.GaussianBlur(grown.astype(np.float32), (0, 0), 4)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_seeds_fix_the_sure_pixels_and_leave_the_rest_probable():
    p = np.array([[0.0, 0.05, 0.3, 0.5, 0.7, 0.95, 1.0]])
    assert grabcut_seeds(p, 0.9).tolist() == [[cv2.GC_BGD, cv2.GC_BGD, cv2.GC_PR_BGD, cv2.GC_PR_FGD,
                                               cv2.GC_PR_FGD, cv2.GC_FGD, cv2.GC_FGD]]
    with pytest.raises(RefineError, match="sure must be above 0.5"):
        grabcut_seeds(p, 0.5)


def test_grabcut_is_opencvs_own_on_the_same_seeds_and_improves_a_blurry_guess():
    image, disc = scene()
    p = blurry_guess(disc)
    refined = grabcut(image, p, sure=0.9, iterations=5)
    seeds = grabcut_seeds(p, 0.9)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seeds, None, bgd, fgd, 5, cv2.GC_INIT_WITH_MASK)
    np.testing.assert_array_equal(refined, np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)))
    assert iou(p >= 0.5, disc) < 0.75 and iou(refined, disc) > 0.97


def test_a_margin_works_around_the_object_only_and_keeps_the_seeds_elsewhere():
    image = scene(160, seed=1)[0]
    small_image, small_disc = scene(96, seed=1)
    image[:96, :96] = small_image                   # a disc in the top-left corner and one in the middle
    truth = np.zeros((160, 160), bool)
    truth[:96, :96] = small_disc
    p = np.zeros((160, 160), np.float32)
    p[:96, :96] = blurry_guess(small_disc)                 # the guess knows only the corner's
    refined = grabcut(image, p, margin=8)
    assert iou(refined, truth) > 0.95 and not refined[120:, 120:].any()


def test_with_one_side_only_the_prediction_stands_and_wrong_inputs_are_clear_errors():
    image, disc = scene(32)
    assert grabcut(image, np.full(disc.shape, 0.7, np.float32)).all()        # all (probable) foreground
    assert not grabcut(image, np.zeros(disc.shape, np.float32)).any()
    with pytest.raises(RefineError, match=r"probabilities \(8, 8\) do not match the image \(32, 32\)"):
        grabcut(image, np.zeros((8, 8), np.float32))
    with pytest.raises(RefineError, match="uint8 RGB"):
        grabcut(image[..., 0], disc.astype(np.float32))


def two_class(p: np.ndarray) -> np.ndarray:
    return np.stack([1 - p, p]).clip(1e-4, 1 - 1e-4).astype(np.float32)


def test_dense_crf_is_pydensecrfs_own_on_the_same_inputs_and_follows_the_image():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image, disc = scene()
    guess = blurry_guess(disc, grow=6)
    probs = two_class(guess)
    ours = dense_crf(image, probs, iterations=5)
    crf = dcrf.DenseCRF2D(96, 96, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    np.testing.assert_allclose(ours, np.asarray(crf.inference(5)).reshape(2, 96, 96), atol=1e-6)
    assert ours.shape == (2, 96, 96) and ours.dtype == np.float32
    assert iou(ours.argmax(0) == 1, disc) > iou(guess >= 0.5, disc) + 0.1


def test_dense_crf_cleans_speckle_in_regions_of_one_colour():
    rng = np.random.default_rng(3)
    truth = np.zeros((64, 96), np.int64)
    truth[:, 32:64], truth[:, 64:] = 1, 2
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220]], float)
    image = np.clip(colours[truth] + rng.normal(0, 10, (64, 96, 3)), 0, 255).astype(np.uint8)
    logits = np.eye(3)[truth].transpose(2, 0, 1) * 1.0 + rng.normal(0, 0.8, (3, 64, 96))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    before = (probs.argmax(0) == truth).mean()
    after = (dense_crf(image, probs, iterations=10).argmax(0) == truth).mean()
    assert before < 0.9 and after > 0.99


def test_dense_crf_takes_a_read_only_image():
    image, disc = scene(32)
    probs = two_class(blurry_guess(disc))
    locked = image.copy()
    locked.flags.writeable = False                 # as a decoded request's image is
    np.testing.assert_array_equal(dense_crf(locked, probs), dense_crf(image, probs))


def test_dense_crf_refuses_probabilities_of_another_shape():
    image, _ = scene(32)
    with pytest.raises(RefineError, match=r"probabilities \(2, 16, 16\) are not \(C, H, W\) for the image"):
        dense_crf(image, np.full((2, 16, 16), 0.5, np.float32))
    with pytest.raises(RefineError, match="crf: the image must be"):
        dense_crf(image[..., :2].copy(), np.full((2, 32, 32), 0.5, np.float32))


def test_a_refinement_travels_in_the_model_meta_and_its_json():
    import json
    from dataclasses import asdict

    from pipeline.models.base import InferenceSettings, ModelMeta, Refinement

    settings = InferenceSettings(False, (1.0,), 1024, (64, 64), 0.25, Refinement("crf", {"iterations": 5}))
    meta = ModelMeta(("a", "b"), inference=settings)
    again = ModelMeta(**json.loads(json.dumps(meta.to_dict())))
    assert again.inference == settings and hash(again) == hash(meta)
    assert again.inference.postprocess.kwargs() == {"iterations": 5}
    assert InferenceSettings(False, (1.0,), 1024, (64, 64), 0.25).postprocess is None      # older metas
    explicitly_none = InferenceSettings(False, (1.0,), 1024, (64, 64), 0.25, {"method": "none"})
    assert asdict(explicitly_none)["postprocess"] is None


def test_refinement_of_a_params_section_and_refine_mask():
    from pipeline.config.params import EvaluateParams
    from pipeline.inference.refine import refine_mask, refinement_of
    from pipeline.models.base import Refinement

    cfg = EvaluateParams.defaults()
    assert refinement_of(cfg) == Refinement("none")
    crf = refinement_of(cfg.model_copy(update={"postprocess": "crf"}))
    assert crf.method == "crf" and crf.kwargs() == cfg.crf.model_dump()
    assert refinement_of(cfg, "grabcut").kwargs() == cfg.grabcut.model_dump()
    image, disc = scene()
    probs = two_class(blurry_guess(disc))
    np.testing.assert_array_equal(refine_mask(image, probs, Refinement("none")), probs.argmax(0))
    np.testing.assert_array_equal(refine_mask(image, probs, Refinement("grabcut", {"sure": 0.9})),
                                  grabcut(image, probs[1], sure=0.9))
    with pytest.raises(RefineError, match=r"grabcut refines a binary mask \(2 classes\); this model has 3"):
        refine_mask(image, np.full((3, 96, 96), 1 / 3, np.float32), Refinement("grabcut"))
