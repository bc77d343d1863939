"""The ``smp`` model family (``model.family: smp``): segmentation_models.pytorch.

``build`` hands the ``model`` section to ``smp.create_model`` unchanged (its keys are smp's
own keyword names) and wraps the result in ``SegmentationModel`` with smp's input size rule.

Pretrained encoders: with ``encoder_weights: imagenet`` and ``$SEG_WEIGHTS_DIR`` set, the
encoder's ImageNet weights come from a verified file in that directory; with the variable
unset, smp downloads them from the Hugging Face hub as usual (``pipeline.models.weights``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import replace

import huggingface_hub
import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from pipeline.config import paths
from pipeline.config.model_params import SmpModelParams
from pipeline.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegmentationModel, cycle_channels
from pipeline.models.weights import (
    ENCODER_WEIGHT_FILES,
    IMAGENET,
    TIMM_PREFIX,
    ensure_encoder_weights,
    read_encoder_weights,
)

# Keys of create_model that ModelParams sets itself; model.kwargs must not repeat them.
_OWN_KEYS = ("arch", "encoder_name", "encoder_weights", "in_channels", "classes")


def build(cfg: SmpModelParams, classes: int, meta: ModelMeta) -> SegmentationModel:
    """The smp network ``cfg`` describes with ``classes`` outputs, wrapped for any input
    size; ``meta`` gets the encoder's normalisation (``normalisation``) unless it gives its
    own. Raises ``ValueError`` naming the key for an unknown ``model.arch``,
    ``model.encoder_name`` or ``model.kwargs`` key, and, when ``$SEG_WEIGHTS_DIR`` is set, a
    clear error if the encoder's weights file is not registered, missing or corrupt (checked
    before the network is built).
    """
    arch = _arch_class(cfg.arch)
    _check_kwargs(arch, cfg)

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
        _load_encoder_state(net.encoder, cfg.encoder_name, state, cfg.in_channels)

    if meta.mean is None:
        mean, std = normalisation(cfg)
        meta = replace(meta, mean=mean, std=std)
    multiple, min_size = input_size_rule(net)
    freeze_unused(net, cfg.in_channels, max(min_size, multiple))
    return SegmentationModel(net, meta, multiple=multiple, min_size=min_size)


def freeze_unused(net: nn.Module, in_channels: int, size: int) -> list[str]:
    """Freeze the parameters no output depends on, and return their names. smp builds an
    encoder's stages beyond ``encoder_depth`` and never runs them (PSPNet's depth 3 leaves
    MobileNetV2's last stages idle); DistributedDataParallel refuses a trainable parameter that
    gets no gradient ("Expected to have finished reduction in the prior iteration"), so the
    multi-worker training of such a model crashed at its second step. Found by one forward pass
    at ``size`` x ``size`` in eval mode (no running statistics change)."""
    training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            out = net(torch.zeros(1, in_channels, size, size))
        outputs = out if isinstance(out, tuple | list) else (out,)
        trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
        total = sum(o.sum() for o in outputs)
        grads = torch.autograd.grad(total, [p for _, p in trainable], allow_unused=True)
    finally:
        net.train(training)
    unused = [name for (name, p), grad in zip(trainable, grads, strict=True) if grad is None]
    for name, p in trainable:
        if name in unused:
            p.requires_grad_(False)
    return unused


def encoder(name: str, weights: str | None, in_channels: int, output_stride: int = 32) -> nn.Module:
    """smp's encoder ``name`` alone (for the decoders of ``pipeline.models.seed``), its ImageNet
    weights read as ``build`` reads them: a verified file from ``$SEG_WEIGHTS_DIR`` when set, else
    smp's download. ``output_stride`` 8 or 16 dilates its last stages. ``ValueError`` naming
    ``model.encoder_name`` for a name smp does not know."""
    if not _is_known_encoder(name):
        raise ValueError(_unknown_encoder_message(name))
    weights_dir = paths.weights_dir() if weights == IMAGENET else None
    state = read_encoder_weights(name, weights_dir) if weights_dir is not None else None
    net = smp.encoders.get_encoder(name, in_channels=3 if state is not None else in_channels,
                                   weights=weights if state is None else None, output_stride=output_stride)
    if state is not None:
        _load_encoder_state(net, name, state, in_channels)
    return net


def _load_encoder_state(net: nn.Module, name: str, state: dict, in_channels: int) -> None:
    """Load a local file's 3-channel weights, then adapt the first conv to ``in_channels``, in
    the order smp itself uses (load, then set_in_channels)."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{ENCODER_WEIGHT_FILES[name].name} does not fit encoder {name!r}: {exc}") from exc
    net.set_in_channels(in_channels, pretrained=True)


def normalisation(cfg: SmpModelParams) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel: the encoder's (``encoder_normalisation``), cycled over
    ``model.in_channels``."""
    mean, std = encoder_normalisation(cfg.encoder_name)
    return cycle_channels(mean, cfg.in_channels), cycle_channels(std, cfg.in_channels)


def ensure_weights(cfg: SmpModelParams) -> None:
    """Before any worker starts: the encoder's pretrained weights can be had
    (``pipeline.models.weights.ensure_encoder_weights``)."""
    ensure_encoder_weights(cfg.encoder_name, cfg.encoder_weights)


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


def _arch_class(arch: str) -> type[nn.Module]:
    """smp's class for ``arch``, matched case-insensitively as ``smp.create_model`` does."""
    found = smp.MODEL_ARCHITECTURES_MAPPING.get(arch.lower())
    if found is None:
        allowed = ", ".join(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise ValueError(f"model.arch: unknown architecture {arch!r}; allowed: {allowed}")
    return found


def _check_kwargs(arch: type[nn.Module], cfg: SmpModelParams) -> None:
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


def _create(cfg: SmpModelParams, *, classes: int, encoder_weights: str | None, in_channels: int) -> nn.Module:
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
