"""What every model family builds: ``SegmentationModel``, a network that takes any input
size plus its ``ModelMeta`` (class names, palette, normalisation, ignore index, inference
settings). The families themselves (``pipeline.models.smp``...) and the registry that
picks one by ``model.family`` (``pipeline.models.registry``) build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
UNRECORDED_TASK = "semantic"    # the task of saved models and prepared data from before tasks were recorded

PAD_REFLECT = "reflect"
PAD_REPLICATE = "replicate"


NO_REFINEMENT = "none"
REFINEMENTS = ("crf", "grabcut")     # pipeline.inference.refine's methods


@dataclass(frozen=True)
class Refinement:
    """A refinement of the prediction with the image (``pipeline.inference.refine``): ``method``
    (``crf``, ``grabcut``, or ``none``: explicitly none, which overrides a model's own) and its
    keyword parameters as sorted (name, value) pairs, so that it stays hashable."""

    method: str
    params: tuple[tuple[str, float | int], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in (NO_REFINEMENT, *REFINEMENTS):
            raise ValueError(f"postprocess: {self.method!r} is not one of none, {', '.join(REFINEMENTS)}")
        pairs = self.params.items() if isinstance(self.params, dict) else self.params
        object.__setattr__(self, "params", tuple(sorted((str(k), v) for k, v in pairs)))

    @classmethod
    def of(cls, value: Any) -> Refinement | None:
        """None, a ``Refinement``, or its ``asdict`` form (read back from JSON) -> a Refinement."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(value["method"], value.get("params", ()))
        raise ValueError(f"postprocess: expected a method and its parameters, got {value!r}")

    def kwargs(self) -> dict[str, float | int]:
        return dict(self.params)


@dataclass(frozen=True)
class InferenceSettings:
    """How a whole image is predicted (``pipeline.inference.predictor.Predictor``'s keywords): flip TTA,
    multi-scale factors, overlapping ``tile_size`` windows above ``tile_above_pixels``, and a
    refinement with the image (``postprocess``; None: none)."""

    flip_tta: bool
    scales: tuple[float, ...]
    tile_above_pixels: int
    tile_size: tuple[int, int]
    tile_overlap: float
    postprocess: Refinement | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "tile_size", tuple(int(t) for t in self.tile_size))
        refinement = Refinement.of(self.postprocess)
        none = refinement is None or refinement.method == NO_REFINEMENT
        object.__setattr__(self, "postprocess", None if none else refinement)


@dataclass(frozen=True)
class ModelMeta:
    """What a saved model needs besides its weights; plain values, saved with ``to_dict``.

    ``mean`` and ``std`` apply per input channel to images scaled to [0, 1] (None: not
    given; ``build_model`` fills in the encoder's); ``palette`` holds one (r, g, b) in
    0..255 per class; ``ignore_index`` is the mask label that marks pixels without a
    class (left out of losses and metrics); ``inference`` the settings a registered model was
    scored with, which its pyfunc and Serve predict with unless told otherwise;
    ``thing_classes`` the 0-based class indices that are countable things (classes.json's
    ``isthing``; the panoptic task's, empty otherwise), the others being stuff.
    """

    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    inference: InferenceSettings | None = None   # what its recorded score used; None: not recorded
    task: str = UNRECORDED_TASK     # its pipeline.tasks name
    thing_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.inference, dict):
            object.__setattr__(self, "inference", InferenceSettings(**self.inference))
        # Accept lists (from JSON or YAML) and store tuples, so the object stays hashable.
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "thing_classes", tuple(int(c) for c in self.thing_classes))
        object.__setattr__(self, "palette", tuple(tuple(int(c) for c in rgb) for rgb in self.palette))
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.palette and len(self.palette) != len(self.class_names):
            raise ValueError(
                f"palette has {len(self.palette)} colours for {len(self.class_names)} class names"
            )
        if any(len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) for rgb in self.palette):
            raise ValueError("palette entries must be (r, g, b) with values in 0..255")
        if self.mean is not None and (len(self.mean) != len(self.std) or any(s <= 0 for s in self.std)):
            raise ValueError("mean and std need one value per channel, and std must be positive")
        self._check_thing_classes()

    def _check_thing_classes(self) -> None:
        things = self.thing_classes
        if len(set(things)) != len(things) or any(c < 0 for c in things):
            raise ValueError(f"thing_classes: expected distinct 0-based class indices, got {list(things)}")
        if self.class_names and any(c >= len(self.class_names) for c in things):
            raise ValueError(f"thing_classes: {list(things)} names classes beyond the "
                             f"{len(self.class_names)} class names (0-based indices)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return asdict(self)


class TrainingOutput(NamedTuple):
    """What a network with a loss of its own returns in training mode (PointRend's point loss):
    ``logits`` as in eval mode, and ``loss(targets)``, its own term for (N, H, W) targets of the
    input's size, added to the pipeline's loss of the logits. The network's own ``loss`` takes
    ``(targets, ignore_index)`` for targets of its padded input; ``SegmentationModel`` pads them
    and supplies its ``meta.ignore_index``. In eval mode such a network returns the logits alone."""

    logits: torch.Tensor
    loss: Callable[..., torch.Tensor]


class SegmentationModel(nn.Module):
    """A family's network that accepts any input size, plus the model's ``meta``.

    ``forward(x)``: x (N, in_channels, H, W) float, normalised with ``meta.mean`` and
    ``meta.std`` -> logits (N, classes, H, W) float. (smp's ``aux_params``, whose
    classification head would make it a tuple, is refused by ``ModelParams``.)

    A network may need sides that are a ``multiple`` of its total stride and at least
    ``min_size`` (the family says which: ``pipeline.models.smp.input_size_rule``).
    The input is padded on the bottom and right to what the network needs, so the
    original pixels keep their coordinates and the crop back to (H, W) is a slice. Padding
    mirrors the image (reflect) so the border looks like more of the same scene: zeros
    would draw an artificial edge the convolutions respond to near the border, and put
    non-image pixels into BatchNorm's training statistics. Reflect needs each pad to be
    shorter than that side of the image, so tiny inputs are padded by repeating the edge
    pixels (replicate) instead, which works for any size.

    ``meta`` is a plain attribute, not a buffer: it is not in ``state_dict()`` and is
    saved beside it (``meta.to_dict()``).
    """

    def __init__(self, net: nn.Module, meta: ModelMeta | None = None, *, multiple: int = 1,
                 min_size: int = 1):
        super().__init__()
        self.net = net
        self.meta = meta if meta is not None else ModelMeta()
        self.multiple, self.min_size = multiple, min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor | TrainingOutput:
        h, w = x.shape[-2:]
        padded = pad_input(x, self.multiple, self.min_size)
        out = self.net(padded)
        if not isinstance(out, TrainingOutput):
            return out[..., :h, :w]
        pad_h, pad_w = padded.shape[-2] - h, padded.shape[-1] - w
        ignore = self.meta.ignore_index

        def loss(targets: torch.Tensor) -> torch.Tensor:
            # The padding has no labels: the net's own loss leaves it out.
            return out.loss(F.pad(targets, (0, pad_w, 0, pad_h), value=ignore), ignore)

        return TrainingOutput(out.logits[..., :h, :w], loss)


def pad_input(x: torch.Tensor, multiple: int, min_size: int = 1) -> torch.Tensor:
    """Pad (N, C, H, W) on the bottom and right to sides that are multiples of
    ``multiple`` and at least ``min_size``.

    Reflect where every pad is shorter than its side, replicate otherwise (see
    ``SegmentationModel``). Returns ``x`` itself when no padding is needed.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (_round_up(max(n, min_size), multiple) - n for n in (h, w))
    if pad_h == 0 and pad_w == 0:
        return x
    mode = PAD_REFLECT if pad_h < h and pad_w < w else PAD_REPLICATE
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple




def cycle_channels(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """Per-channel values for ``n`` input channels from RGB ones, cycled as smp (and timm)
    adapt a pretrained first convolution to ``n`` channels."""
    return tuple(values[i % len(values)] for i in range(n))
