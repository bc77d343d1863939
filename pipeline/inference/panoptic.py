"""Panoptic labellings of whole images at native resolution, for serving and evaluation.

A panoptic model (``pipeline.models.panoptic_fpn``) in eval mode returns per image Mask
R-CNN's instances of the thing classes and the semantic branch's map (a stuff class per
pixel, or ``THING``). ``PanopticPredictor.panoptic(images)`` turns them into one
``Panoptic`` per image: the instances as ``pipeline.inference.instances.to_instances`` gives
them (masks above ``mask_threshold``), fused with the semantic map by
``pipeline.inference.panoptic_fusion.fuse`` (``min_score``, ``overlap_threshold``,
``stuff_min_area``).

Images go through the network whole, images of one size together. There is no tiling:
an image above ``tile_above_pixels`` is refused with a message rather than predicted with
memory growing with its size; flip TTA and multi-scale prediction are defined for class
probabilities, not for instances, and are refused too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.inference.instances import to_instances
from pipeline.inference.panoptic_fusion import (
    DEFAULT_MIN_SCORE,
    DEFAULT_OVERLAP_THRESHOLD,
    DEFAULT_STUFF_MIN_AREA,
    fuse,
)
from pipeline.inference.predictor import RecordedSettings, _check, refuse_probability_tta
from pipeline.inference.tensors import forward_images
from pipeline.metrics.panoptic_types import Panoptic


class ImageTooLargeError(ValueError):
    """An image above the predictor's pixel limit."""


@dataclass
class PanopticPredictor(RecordedSettings):
    """Panoptic labellings of whole images (see the module doc). The first five fields are
    ``InferenceSettings``' (``for_model`` reads them from the model)."""

    mask_threshold: float = 0.5
    min_score: float = DEFAULT_MIN_SCORE
    overlap_threshold: float = DEFAULT_OVERLAP_THRESHOLD
    stuff_min_area: int = DEFAULT_STUFF_MIN_AREA

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_probability_tta(self, "panoptic")
        num_classes = len(self.model.meta.class_names)
        things = set(self.model.meta.thing_classes)
        if not things:
            raise ValueError("the model records no thing classes (meta.thing_classes): not a panoptic model")
        self.isthing = [c in things for c in range(num_classes)]

    @property
    def max_pixels(self) -> int:
        """The largest image (width x height) it predicts: it does not tile."""
        return self.tile_above_pixels

    @torch.inference_mode()
    def panoptic(self, images: list[np.ndarray]) -> list[Panoptic]:
        """(H, W, 3) uint8 RGB images of any sizes -> their ``Panoptic`` labellings."""
        for image in images:
            _check(image)
            pixels = image.shape[0] * image.shape[1]
            if pixels > self.tile_above_pixels:
                raise ImageTooLargeError(
                    f"an image of {image.shape[1]}x{image.shape[0]} ({pixels} pixels): panoptic models "
                    f"predict whole images only, up to tile_above_pixels={self.tile_above_pixels}; "
                    "downscale it or raise the limit")
        out: list[Panoptic | None] = [None] * len(images)
        same_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            same_size[image.shape].append(i)
        for (h, w, _), indices in same_size.items():
            outputs = forward_images(self.model, [images[i] for i in indices])
            for i, output in zip(indices, outputs, strict=True):
                out[i] = self.fused(output, h, w)
        return out

    def fused(self, output: dict, height: int, width: int) -> Panoptic:
        """One image's model output -> its ``Panoptic``."""
        instances = to_instances(output, height, width, self.mask_threshold)
        semantic = output["semantic"][:height, :width].detach().cpu().numpy()
        return fuse(instances, semantic, self.isthing, min_score=self.min_score,
                    overlap_threshold=self.overlap_threshold, stuff_min_area=self.stuff_min_area,
                    void=self.model.meta.ignore_index)
