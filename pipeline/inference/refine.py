"""Refining a prediction with the image: a fully connected CRF (Kraehenbuehl and Koltun 2011,
DeepLab v1/v2's refinement; ``pydensecrf2``) over the class probabilities, and GrabCut (Rother et
al. 2004, OpenCV's ``cv2.grabCut``) seeded from a foreground probability map.

``dense_crf``: the unary is -log of the probabilities (``pydensecrf.utils.unary_from_softmax``);
two pairwise kernels with Potts compatibility, a Gaussian over positions (``gaussian_sxy``,
smoothness) and a bilateral one over positions and colours (``bilateral_sxy``, ``bilateral_srgb``,
appearance), weighted by their ``compat``; mean-field ``iterations``; it returns the refined
marginals (C, H, W). The library is an optional extra (``pip install
'segmentation-pipeline[crf]'``, built from source with g++): without it, ``dense_crf`` says so.

``grabcut_seeds`` turns the probabilities into GrabCut's four labels: pixels the model is sure
of (``p >= sure`` foreground, ``p <= 1 - sure`` background) are fixed, the rest are probable
foreground (``p >= 0.5``) or probable background; GrabCut then fits its colour models to the
image and re-decides the probable pixels only. ``grabcut`` returns the refined binary mask;
where the region it works on holds only one side (all foreground or all background) GrabCut's
colour models have nothing to compare, and the prediction stands as it is. OpenCV's RNG is
seeded first, so a refinement is reproducible. ``margin`` crops the work to the probable
pixels' bounding box plus that many pixels (an instance's neighbourhood); the rest keeps its
seed.

``refine_mask`` applies a ``Refinement`` (``pipeline.models.base``: a method and its
parameters, as a model records them) to one image's class probabilities; ``refinement_of``
makes one from a params section (``evaluate`` or ``serve``: ``postprocess``, ``crf``,
``grabcut``).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from pipeline.models.base import NO_REFINEMENT, Refinement


class RefineError(ValueError):
    """A refinement that cannot run on this input (the message says why)."""


def check_available(method: str) -> None:
    """``RefineError`` when ``method`` needs a library this environment lacks (crf: pydensecrf2)."""
    if method == "crf":
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError:
            raise RefineError(CRF_MISSING) from None


CRF_MISSING = ("crf: needs the optional pydensecrf2 (pip install 'segmentation-pipeline[crf]', which "
               "builds it with g++)")


def dense_crf(image: np.ndarray, probabilities: np.ndarray, *, iterations: int = 5, gaussian_sxy: float = 3,
              gaussian_compat: float = 3, bilateral_sxy: float = 80, bilateral_srgb: float = 13,
              bilateral_compat: float = 10) -> np.ndarray:
    """(H, W, 3) uint8 RGB and (C, H, W) class probabilities -> (C, H, W) float32 refined marginals.
    The defaults are the kernel parameters of pydensecrf's own example."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise RefineError(CRF_MISSING) from None
    _check_image(image, "crf")
    if probabilities.ndim != 3 or probabilities.shape[1:] != image.shape[:2]:
        raise RefineError(f"crf: probabilities {probabilities.shape} are not (C, H, W) for the image "
                          f"{image.shape[:2]}")
    classes, height, width = probabilities.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    # pydensecrf takes a writable C-ordered buffer only (a decoded request's image is read-only).
    rgb = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(classes, height, width)


def _check_image(image: np.ndarray, what: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RefineError(f"{what}: the image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")


def grabcut_seeds(probability: np.ndarray, sure: float) -> np.ndarray:
    """(H, W) foreground probabilities in [0, 1] -> (H, W) uint8 GrabCut labels
    (``cv2.GC_BGD``, ``GC_FGD``, ``GC_PR_BGD``, ``GC_PR_FGD``)."""
    if not 0.5 < sure <= 1:
        raise RefineError(f"grabcut: sure must be above 0.5 and at most 1, got {sure}")
    seeds = np.where(probability >= 0.5, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[probability >= sure] = cv2.GC_FGD
    seeds[probability <= 1 - sure] = cv2.GC_BGD
    return seeds


def grabcut(image: np.ndarray, probability: np.ndarray, *, sure: float = 0.9, iterations: int = 5,
            margin: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB and (H, W) foreground probabilities -> (H, W) bool refined mask."""
    _check_image(image, "grabcut")
    if probability.shape != image.shape[:2]:
        raise RefineError(f"grabcut: probabilities {probability.shape} do not match the image "
                          f"{image.shape[:2]}")
    seeds = grabcut_seeds(probability, sure)
    top, left, bottom, right = 0, 0, *seeds.shape
    if margin is not None:
        rows, cols = np.nonzero(seeds != cv2.GC_BGD)
        if rows.size:
            top, left = max(0, rows.min() - margin), max(0, cols.min() - margin)
            bottom = min(seeds.shape[0], rows.max() + margin + 1)
            right = min(seeds.shape[1], cols.max() + margin + 1)
    crop = np.ascontiguousarray(seeds[top:bottom, left:right])
    foreground = np.isin(crop, (cv2.GC_FGD, cv2.GC_PR_FGD))
    if foreground.all() or not foreground.any():
        return np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))          # one side only: nothing to refine
    bgr = np.ascontiguousarray(image[top:bottom, left:right, ::-1])
    background_model, foreground_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)           # its colour models start from k-means on OpenCV's global RNG: reproducible
    cv2.grabCut(bgr, crop, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
    out = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))
    out[top:bottom, left:right] = np.isin(crop, (cv2.GC_FGD, cv2.GC_PR_FGD))
    return out


def refinement_of(cfg: Any, method: str | None = None) -> Refinement | None:
    """The refinement a params section (evaluate's or serve's: ``postprocess``, ``crf``,
    ``grabcut``) asks for, or ``method`` with that section's parameters; None when the section's
    ``postprocess`` is null (serve: the model's own)."""
    method = method if method is not None else cfg.postprocess
    if method is None:
        return None
    if method == NO_REFINEMENT:
        return Refinement(NO_REFINEMENT)
    return Refinement(method, getattr(cfg, method).model_dump())


def refine_mask(image: np.ndarray, probabilities: np.ndarray, refinement: Refinement) -> np.ndarray:
    """(H, W, 3) uint8 RGB and its (C, H, W) class probabilities -> (H, W) uint8 class indices,
    refined as ``refinement`` says (``grabcut`` takes two classes: class 1 is the foreground)."""
    if refinement.method == "crf":
        return dense_crf(image, probabilities, **refinement.kwargs()).argmax(0).astype(np.uint8)
    if refinement.method == "grabcut":
        if probabilities.shape[0] != 2:
            raise RefineError(f"grabcut refines a binary mask (2 classes); this model has "
                              f"{probabilities.shape[0]}: use crf")
        return grabcut(image, probabilities[1], **refinement.kwargs()).astype(np.uint8)
    return probabilities.argmax(0).astype(np.uint8)
