"""Instances and a semantic map fused into one panoptic labelling (``Panoptic``), by the
heuristic of Panoptic FPN (Kirillov, Girshick, He and Dollar, CVPR 2019, after the one of
the Panoptic Segmentation paper, Kirillov et al. 2019):

1. instances in score order, highest first; those scoring below ``min_score`` dropped;
2. overlap removal: each instance takes the pixels of its mask that no higher-scored
   instance took, unless more than ``overlap_threshold`` of its mask is taken already, in
   which case it is dropped (a duplicate of a better detection);
3. things over stuff: only pixels no instance took are left to the semantic map; each
   stuff class there becomes one segment, unless its area is below ``stuff_min_area``
   pixels, whose pixels stay void (the paper removes "stuff regions ... under a given area
   threshold").

It is a function of its own so that any instance model's ``Instances`` and any semantic
model's argmax can be fused, not only the two heads of one Panoptic FPN.

Defaults (the constants below). The paper gives the steps, its authors' implementation
(detectron2's Panoptic FPN, ``MODEL.PANOPTIC_FPN.COMBINE``) the numbers: score 0.5,
overlap 0.5, stuff area 4096 pixels, the last measured on COCO images (about 640 x 480, so
4096 pixels are 1.3% of an image). Our CPU-scale benchmark is CamVid at 360 x 480: scaled by
image area the COCO limit would be 2304 pixels, but CamVid's thin stuff classes are small
in every image. Measured on the true labels of 285 CamVid images (every other train image
and all of val), the share of per-image stuff segments below a limit:

    limit (px)   Pole   SignSymbol   Fence   Pavement   all eight stuff classes
    256          0.02   0.06         0.07    0.01       0.02
    2304         0.84   0.79         0.24    0.12       0.26
    4096         0.96   0.92         0.49    0.19       0.33

A true segment below the limit can never be predicted, so 2304 or 4096 would score Pole and
SignSymbol near PQ 0 whatever the model. ``DEFAULT_STUFF_MIN_AREA`` = 256 pixels (16 x 16, 0.15%
of a CamVid image) still drops specks of a class while keeping 98% of the true stuff segments;
pass ``PAPER_STUFF_MIN_AREA`` to reproduce the paper's setting on COCO-sized images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.inference.rle import runs
from pipeline.metrics.confusion import IGNORE_INDEX
from pipeline.metrics.instance import Instances
from pipeline.metrics.panoptic_types import VOID, Panoptic, Segment

PAPER_MIN_SCORE = 0.5            # instances scoring less are not pasted
PAPER_OVERLAP_THRESHOLD = 0.5    # an instance whose mask is more than this share taken is dropped
PAPER_STUFF_MIN_AREA = 4096      # pixels, on COCO images (about 640 x 480)

DEFAULT_MIN_SCORE = PAPER_MIN_SCORE
DEFAULT_OVERLAP_THRESHOLD = PAPER_OVERLAP_THRESHOLD
DEFAULT_STUFF_MIN_AREA = 256     # pixels, for CamVid's 360 x 480 (see the module doc)


def fuse(instances: Instances, semantic: np.ndarray, isthing: Sequence[bool], *,
         min_score: float = DEFAULT_MIN_SCORE, overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD,
         stuff_min_area: int = DEFAULT_STUFF_MIN_AREA, void: int = IGNORE_INDEX) -> Panoptic:
    """One image's predicted instances and semantic map -> its ``Panoptic`` (see the module doc).

    instances: scored predictions of thing classes (0-based dataset class indices), masks as
        COCO RLE of the image's size, in any order.
    semantic: (H, W) integer dataset class indices. A pixel is stuff when its class is a
        stuff class; pixels of a thing class, of ``void`` (the unlabelled value) or negative
        (Panoptic FPN's semantic head writes -1 for its one "thing" channel) are not.
    isthing: per dataset class, whether it is a thing class.

    Segment ids are 1, 2, ... in the order the segments are made: the instances kept, by
    score (ties in the order given), then the stuff classes by class index. Thing segments
    carry their instance's score, stuff segments none.
    """
    semantic = _checked_semantic(semantic, instances, len(isthing), void)
    if not 0.0 <= overlap_threshold <= 1.0:
        raise ValueError(f"overlap_threshold must lie in [0, 1], not {overlap_threshold}")
    if stuff_min_area < 0:
        raise ValueError(f"stuff_min_area must be >= 0 pixels, not {stuff_min_area}")
    h, w = semantic.shape
    # Column-major, as COCO RLE runs: each instance touches only its own pixels.
    canvas = np.zeros(h * w, np.int32)
    segments: list[Segment] = []
    for k in _by_score(instances, isthing):
        score = float(instances.scores[k])
        if score < min_score:
            break
        pixels = _pixels(instances.masks[k])
        if not len(pixels):
            continue
        free = pixels[canvas[pixels] == VOID]
        if (len(pixels) - len(free)) / len(pixels) > overlap_threshold or not len(free):
            continue
        segments.append(Segment(len(segments) + 1, int(instances.classes[k]), score=score))
        canvas[free] = segments[-1].id
    ids = np.ascontiguousarray(canvas.reshape(w, h).T)
    _paste_stuff(ids, semantic, isthing, stuff_min_area, segments)
    return Panoptic(ids=ids, segments=segments)


def _checked_semantic(semantic: np.ndarray, instances: Instances, num_classes: int, void: int) -> np.ndarray:
    semantic = np.asarray(semantic)
    if semantic.ndim != 2 or not np.issubdtype(semantic.dtype, np.integer):
        raise ValueError(f"semantic must be an (H, W) integer class map, not {semantic.dtype} "
                         f"of shape {semantic.shape}")
    if semantic.shape != (instances.height, instances.width):
        raise ValueError(f"semantic map of {semantic.shape[0]}x{semantic.shape[1]}, instances of "
                         f"{instances.height}x{instances.width}")
    if 0 <= void < num_classes:
        raise ValueError(f"void={void} is a class index (0..{num_classes - 1}); it must be the "
                         "value of unlabelled pixels")
    values = np.unique(semantic)
    wrong = values[(values >= num_classes) & (values != void)]
    if len(wrong):
        raise ValueError(f"semantic holds {wrong.tolist()}: expected class indices 0..{num_classes - 1}, "
                         f"the void value {void} or a negative value (not stuff)")
    return semantic


def _by_score(instances: Instances, isthing: Sequence[bool]) -> list[int]:
    """Instance indices, highest score first (stable), each checked to be of a thing class."""
    if len(instances.scores) != len(instances):
        raise ValueError(f"{len(instances)} instances with {len(instances.scores)} scores: "
                         "fusion needs scored predictions")
    for k, c in enumerate(instances.classes):
        if not 0 <= c < len(isthing) or not isthing[c]:
            things = [i for i, t in enumerate(isthing) if t]
            raise ValueError(f"instance {k} has class {c}; instances must be of a thing class {things}")
    return sorted(range(len(instances)), key=lambda k: -instances.scores[k])


def _pixels(mask: dict) -> np.ndarray:
    """The column-major offsets (int64) of a COCO RLE mask's pixels."""
    starts, stops = runs(mask)
    lengths = stops - starts
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def _paste_stuff(ids: np.ndarray, semantic: np.ndarray, isthing: Sequence[bool], min_area: int,
                 segments: list[Segment]) -> None:
    """Each stuff class on the pixels still void becomes one segment of ``ids`` (in place,
    appended to ``segments``), unless it covers fewer than ``min_area`` of them."""
    num_classes = len(isthing)
    stuff = np.array([not t for t in isthing], bool)
    free = ids == VOID
    classes = semantic[free].astype(np.int64)
    inside = (classes >= 0) & (classes < num_classes)
    classes = np.where(inside, classes, num_classes)      # not a class: one bin past the last
    area = np.bincount(classes, minlength=num_classes + 1)[:num_classes]
    lut = np.zeros(num_classes + 1, np.int32)             # class -> segment id (VOID: none)
    for c in np.flatnonzero(stuff & (area > 0) & (area >= min_area)):
        segments.append(Segment(len(segments) + 1, int(c)))
        lut[c] = segments[-1].id
    ids[free] = lut[classes]
