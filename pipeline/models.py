"""Build the segmentation network from the ``model`` params section.

``build_model`` hands the section to ``smp.create_model`` unchanged (its keys are smp's
own keyword names) and wraps the result in ``SegmentationModel``, which takes inputs of
any height and width and carries what a checkpoint needs to be used on its own (class
names, palette, normalisation, ignore index).

Pretrained encoders: with ``encoder_weights: imagenet`` and ``$SEG_WEIGHTS_DIR`` set, the
encoder's ImageNet weights come from a verified file in that directory; with the variable
unset, smp downloads them from the Hugging Face hub as usual (``pipeline.weights``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import huggingface_hub
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import paths
from pipeline.params import ModelParams
from pipeline.weights import ENCODER_WEIGHT_FILES, IMAGENET, TIMM_PREFIX, read_encoder_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

PAD_REFLECT = "reflect"
PAD_REPLICATE = "replicate"

# Keys of create_model that ModelParams sets itself; model.kwargs must not repeat them.
_OWN_KEYS = ("arch", "encoder_name", "encoder_weights", "in_channels", "classes")


@dataclass(frozen=True)
class InferenceSettings:
    """How a whole image is predicted (``pipeline.predictor.Predictor``'s keywords): flip TTA,
    multi-scale factors, and overlapping ``tile_size`` windows above ``tile_above_pixels``."""

    flip_tta: bool
    scales: tuple[float, ...]
    tile_above_pixels: int
    tile_size: tuple[int, int]
    tile_overlap: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "tile_size", tuple(int(t) for t in self.tile_size))


@dataclass(frozen=True)
class ModelMeta:
    """What a saved model needs besides its weights; plain values, saved with ``to_dict``.

    ``mean`` and ``std`` apply per input channel to images scaled to [0, 1] (None: not
    given; ``build_model`` fills in the encoder's); ``palette`` holds one (r, g, b) in
    0..255 per class; ``ignore_index`` is the mask label that marks pixels without a
    class (left out of losses and metrics); ``inference`` the settings a registered model was
    scored with, which its pyfunc and Serve predict with unless told otherwise.
    """

    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    inference: InferenceSettings | None = None   # what its recorded score used; None: not recorded

    def __post_init__(self) -> None:
        if isinstance(self.inference, dict):
            object.__setattr__(self, "inference", InferenceSettings(**self.inference))
        # Accept lists (from JSON or YAML) and store tuples, so the object stays hashable.
        object.__setattr__(self, "class_names", tuple(self.class_names))
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return asdict(self)


class SegmentationModel(nn.Module):
    """An smp network that accepts any input size, plus the model's ``meta``.

    ``forward(x)``: x (N, in_channels, H, W) float, normalised with ``meta.mean`` and
    ``meta.std`` -> logits (N, classes, H, W) float. (smp's ``aux_params``, whose
    classification head would make it a tuple, is refused by ``ModelParams``.)

    An smp encoder downsamples by ``encoder.output_stride`` (32 unless dilated), and the
    architectures reject a height or width that is not a multiple of it (Unet instead
    resamples its skip features to fit); PAN and DPT need more (``input_size_rule``).
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

    def __init__(self, net: nn.Module, meta: ModelMeta | None = None):
        super().__init__()
        self.net = net
        self.meta = meta if meta is not None else ModelMeta()
        self.multiple, self.min_size = input_size_rule(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.net(pad_input(x, self.multiple, self.min_size))[..., :h, :w]


def input_size_rule(net: nn.Module) -> tuple[int, int]:
    """(multiple, minimum) for the input height and width that ``net`` handles exactly.

    Read from smp 0.6's source: every architecture needs sides divisible by
    ``encoder.output_stride`` (2**depth, or 8/16 for dilated encoders), and two need more.
    """
    stride = int(net.encoder.output_stride)
    if isinstance(net, smp.PAN):
        # PAN's FPA block max-pools the deepest (1/stride) feature three more times.
        return stride, 8 * stride
    if isinstance(net, smp.DPT):
        # DPT resamples its k ViT features to 1/4 .. 1/2**(k+1) of the input, the last with
        # a stride-2 conv, then fuses them with x2 upsampling: that last one must be whole.
        return math.lcm(stride, 2 ** (len(net.encoder.output_strides) + 1)), stride
    return stride, stride


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


def build_model(cfg: ModelParams, num_classes: int, meta: ModelMeta | None = None) -> SegmentationModel:
    """The network ``cfg`` describes, wrapped for any input size.

    ``num_classes`` (from the prepared dataset's classes.json) is used when
    ``cfg.classes`` is null. ``meta`` (default: empty) gets the encoder's normalisation
    (``encoder_normalisation``) unless it gives its own. Raises ``ValueError`` naming the
    key for an unknown ``model.arch``, ``model.encoder_name`` or ``model.kwargs`` key,
    and, when ``$SEG_WEIGHTS_DIR`` is set, a clear error if the encoder's weights file
    is not registered, missing or corrupt (checked before the network is built).
    """
    classes = cfg.classes if cfg.classes is not None else num_classes
    arch = _arch_class(cfg.arch)
    _check_kwargs(arch, cfg)
    meta = meta if meta is not None else ModelMeta()
    if meta.class_names and len(meta.class_names) != classes:
        raise ValueError(f"meta has {len(meta.class_names)} class names for a model with {classes} classes")
    if meta.mean is not None and len(meta.mean) != cfg.in_channels:
        raise ValueError(f"meta.mean has {len(meta.mean)} values for model.in_channels={cfg.in_channels}")

    weights_dir = paths.weights_dir() if cfg.encoder_weights == IMAGENET else None
    state = read_encoder_weights(cfg.encoder_name, weights_dir) if weights_dir is not None else None
    net = _create(
        cfg,
        classes=classes,
        # A local file replaces smp's download: build with random weights, then load.
        # The file holds 3-channel weights, so the first conv is adapted only after loading,
        # in the order smp itself uses (load, then set_in_channels).
        encoder_weights=cfg.encoder_weights if state is None else None,
        in_channels=cfg.in_channels if state is None else 3,
    )
    if state is not None:
        try:
            net.encoder.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            file = ENCODER_WEIGHT_FILES[cfg.encoder_name].name
            raise RuntimeError(f"{file} does not fit encoder {cfg.encoder_name!r}: {exc}") from exc
        net.encoder.set_in_channels(cfg.in_channels, pretrained=True)

    if meta.mean is None:
        mean, std = encoder_normalisation(cfg.encoder_name)
        meta = replace(meta, mean=_cycle(mean, cfg.in_channels), std=_cycle(std, cfg.in_channels))
    return SegmentationModel(net, meta)


def encoder_normalisation(encoder_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, for images scaled to [0, 1], that the encoder's
    ImageNet weights expect.

    Taken from ``smp.encoders.get_preprocessing_params`` where that needs no network:
    for ``tu-`` encoders it reads timm's bundled config; for smp's own encoders it reads
    a config.json from the Hugging Face hub (about 30 s of retries offline), so it is
    asked only when that file is already in the local hub cache, where smp puts it when
    it downloads the weights. Otherwise, and for names without ImageNet settings,
    ImageNet's mean and std, which the torchvision files in ``ENCODER_WEIGHT_FILES``
    were trained with.
    """
    if not (encoder_name.startswith(TIMM_PREFIX) or _hub_config_cached(encoder_name)):
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        params = smp.encoders.get_preprocessing_params(encoder_name, pretrained=IMAGENET)
    except (KeyError, ValueError, RuntimeError):  # unknown name, or no pretrained config
        return IMAGENET_MEAN, IMAGENET_STD
    if params["input_space"] != "RGB":
        raise ValueError(f"encoder {encoder_name!r} expects {params['input_space']} input, not RGB")
    # mean/std given for inputs in 0..255 are the same normalisation divided by 255.
    scale = float(params["input_range"][1])
    return (
        tuple(float(m) / scale for m in params["mean"]),
        tuple(float(s) / scale for s in params["std"]),
    )


def _hub_config_cached(encoder_name: str) -> bool:
    settings = smp.encoders.encoders.get(encoder_name, {}).get("pretrained_settings", {}).get(IMAGENET)
    if settings is None:
        return False
    found = huggingface_hub.try_to_load_from_cache(
        settings["repo_id"], "config.json", revision=settings["revision"]
    )
    return isinstance(found, str)


def _cycle(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    # smp adapts a pretrained first conv to n channels by cycling its RGB filters; do the same here.
    return tuple(values[i % len(values)] for i in range(n))


def _arch_class(arch: str) -> type[nn.Module]:
    """smp's class for ``arch``, matched case-insensitively as ``smp.create_model`` does."""
    found = smp.MODEL_ARCHITECTURES_MAPPING.get(arch.lower())
    if found is None:
        allowed = ", ".join(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise ValueError(f"model.arch: unknown architecture {arch!r}; allowed: {allowed}")
    return found


def _check_kwargs(arch: type[nn.Module], cfg: ModelParams) -> None:
    """Reject model.kwargs keys that would clash with, or silently miss, smp's keywords.

    smp's architectures take ``**kwargs`` and hand them to the encoder, where only timm
    (``tu-``) encoders use them: for smp's own encoders a misspelt key would be dropped
    without a word, so it is an error here.
    """
    for key in cfg.kwargs:
        if key in _OWN_KEYS:
            raise ValueError(f"model.kwargs.{key}: set model.{key} instead")
    if cfg.encoder_name.startswith(TIMM_PREFIX):
        return
    params = inspect.signature(arch.__init__).parameters
    named = [p for p, v in params.items() if p != "self" and v.kind is not inspect.Parameter.VAR_KEYWORD]
    for key in cfg.kwargs:
        if key not in named:
            raise ValueError(
                f"model.kwargs.{key}: not a keyword of smp.{arch.__name__} "
                f"(allowed: {', '.join(k for k in named if k not in _OWN_KEYS)})"
            )


def _create(cfg: ModelParams, *, classes: int, encoder_weights: str | None, in_channels: int) -> nn.Module:
    """``smp.create_model`` with smp's and timm's name errors turned into ValueErrors naming the key."""
    try:
        return smp.create_model(
            arch=cfg.arch,
            encoder_name=cfg.encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **cfg.kwargs,
        )
    except (KeyError, RuntimeError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        if not _is_known_encoder(cfg.encoder_name):
            raise ValueError(_unknown_encoder_message(cfg.encoder_name)) from exc
        if "pretrained weights" in str(message):  # smp: this encoder has no such weights
            available = smp.encoders.encoders[cfg.encoder_name]["pretrained_settings"]
            raise ValueError(
                f"model.encoder_weights: smp has no {encoder_weights!r} weights for encoder "
                f"{cfg.encoder_name!r} (only {', '.join(available)}); use null or another encoder"
            ) from exc
        if isinstance(exc, ValueError):  # smp's own check of an arch/encoder combination
            where = f"arch {cfg.arch!r}, encoder_name {cfg.encoder_name!r}"
            raise ValueError(f"model ({where}): {message}") from exc
        raise


def _is_known_encoder(name: str) -> bool:
    if name.startswith(TIMM_PREFIX):
        return timm.is_model(name[len(TIMM_PREFIX):])
    # smp maps some deprecated "timm-" names, not in its encoder list, to "tu-" encoders.
    return name in smp.encoders.get_encoder_names() or smp.encoders.is_equivalent_to_timm_universal(name)


def _unknown_encoder_message(name: str) -> str:
    smp_names = smp.encoders.get_encoder_names()
    if name.startswith(TIMM_PREFIX):
        close = difflib.get_close_matches(name[len(TIMM_PREFIX):], timm.list_models(), n=5)
        hint = ", ".join(TIMM_PREFIX + c for c in close) or "none"
        return (
            f"model.encoder_name: unknown timm encoder {name!r}; "
            f"close matches: {hint} (see timm.list_models())"
        )
    close = difflib.get_close_matches(name, smp_names, n=5) or smp_names[:5]
    return (
        f"model.encoder_name: unknown encoder {name!r}; allowed: one of smp's {len(smp_names)} encoders "
        f"(e.g. {', '.join(close)}; see smp.encoders.get_encoder_names()) or '{TIMM_PREFIX}<timm model name>'"
    )
