"""The ``seed`` model family (``model.family: seed``): the classic architectures of
``pipeline.models.seed``, built from ``SeedModelParams`` and wrapped in ``SegmentationModel``.

``encoder_name`` null is the arch's own encoder: the paper's VGG-16 for FCN and DeepLab (no
ImageNet VGG weights are verified here, so trained from scratch), the whole network for
SegNet, ENet and FC-DenseNet. Otherwise it names an smp encoder, whose ImageNet weights come
as for the ``smp`` family (``pipeline.models.smp.encoder``); DeepLab builds it at output
stride 8, as PointRend and Gated-SCNN do. ``kwargs`` are the arch's options: UNet's
``upsampling`` and ``skip_merge``, PointRend's ``train_points`` and ``subdivision_points``,
DeepLab's ``jpu`` (FastFCN's joint pyramid upsampling over an undilated smp encoder in place of
dilation), FC-DenseNet's ``memory_efficient`` (default true: dense blocks recomputed in the
backward pass, see ``tiramisu``); the others take none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from pipeline.config.model_params import SEED_DEEPLAB_ARCHS, SEED_FCN_ARCHS, SeedModelParams
from pipeline.models import smp as smp_family
from pipeline.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegmentationModel, cycle_channels
from pipeline.models.seed import deeplab, fcn, gscnn, pointrend, tiramisu, unet
from pipeline.models.seed.enet import ENet
from pipeline.models.seed.segnet import SegNet
from pipeline.models.weights import ensure_encoder_weights

ARCH_OPTIONS: dict[str, tuple[str, ...]] = {                  # model.kwargs keys
    "UNet": ("upsampling", "skip_merge"), "PointRend": ("train_points", "subdivision_points"),
    "DeepLabV1": ("jpu",), "DeepLabV2": ("jpu",),
    **{arch: ("memory_efficient",) for arch in tiramisu.VARIANTS}}
POINTS_RANGE = (16, 1 << 20)
DEEPLAB_RATES = {"DeepLabV1": deeplab.V1_RATES, "DeepLabV2": deeplab.V2_RATES}


def build(cfg: SeedModelParams, classes: int, meta: ModelMeta) -> SegmentationModel:
    """The network ``cfg`` describes with ``classes`` outputs, padded to its output stride.
    ``ValueError`` naming the key for a ``model.kwargs`` option the arch does not take or a
    value it refuses (UNet's ``upsampling: max_unpool``), or an unknown ``encoder_name``."""
    _check_kwargs(cfg)
    net = _BUILDERS[_kind(cfg.arch)](cfg, classes)
    if meta.mean is None:
        mean, std = normalisation(cfg)
        meta = replace(meta, mean=mean, std=std)
    # The smp encoder's too: built at 8 under DeepLab, PointRend and Gated-SCNN (32 under JPU),
    # at 32 under the others.
    stride = net.output_stride
    return SegmentationModel(net, meta, multiple=stride, min_size=stride)


def normalisation(cfg: SeedModelParams) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """An smp encoder's own (mean, std); ImageNet's for the archs' own encoders (images in the
    usual range, as the papers trained them); cycled over ``model.in_channels``."""
    if cfg.encoder_name is not None:
        return _cycled(smp_family.encoder_normalisation(cfg.encoder_name), cfg.in_channels)
    return _cycled((IMAGENET_MEAN, IMAGENET_STD), cfg.in_channels)


def ensure_weights(cfg: SeedModelParams) -> None:
    """An smp encoder's pretrained weights can be had (the archs' own encoders have none)."""
    if cfg.encoder_name is not None:
        ensure_encoder_weights(cfg.encoder_name, cfg.encoder_weights)


def _cycled(mean_std: tuple[tuple[float, ...], tuple[float, ...]], channels: int):
    mean, std = mean_std
    return cycle_channels(mean, channels), cycle_channels(std, channels)


def _check_kwargs(cfg: SeedModelParams) -> None:
    allowed = ARCH_OPTIONS.get(cfg.arch, ())
    for key in cfg.kwargs:
        if key not in allowed:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
            raise ValueError(f"model.kwargs.{key}: not an option of seed arch {cfg.arch} (it {takes})")
    for key in ("train_points", "subdivision_points"):
        value = cfg.kwargs.get(key)
        if value is not None and not (isinstance(value, int) and POINTS_RANGE[0] <= value <= POINTS_RANGE[1]):
            raise ValueError(f"model.kwargs.{key}: an integer from {POINTS_RANGE[0]} to {POINTS_RANGE[1]}, "
                             f"not {value!r}")
    for key in ("jpu", "memory_efficient"):
        if key in cfg.kwargs and not isinstance(cfg.kwargs[key], bool):
            raise ValueError(f"model.kwargs.{key}: true or false, not {cfg.kwargs[key]!r}")
    if cfg.kwargs.get("jpu", False) and cfg.encoder_name is None:
        raise ValueError("model.kwargs.jpu: joint pyramid upsampling reads an smp encoder's stride-8, "
                         "16 and 32 maps; name one in model.encoder_name (the paper's VGG-16 is "
                         "dilated instead)")
    if cfg.arch == "UNet":
        try:
            unet.check_choices(cfg.kwargs.get("upsampling", unet.DEFAULT_UPSAMPLING),
                               cfg.kwargs.get("skip_merge", unet.DEFAULT_SKIP_MERGE))
        except ValueError as exc:
            raise ValueError(f"model.kwargs: {exc}") from None


def _kind(arch: str) -> str:
    if arch in SEED_FCN_ARCHS:
        return "fcn"
    if arch in SEED_DEEPLAB_ARCHS:
        return "deeplab"
    if arch.startswith("FCDenseNet"):
        return "fcdensenet"
    return arch


def _encoder(cfg: SeedModelParams, output_stride: int = 32) -> nn.Module:
    return smp_family.encoder(cfg.encoder_name, cfg.encoder_weights, cfg.in_channels, output_stride)


def _fcn(cfg: SeedModelParams, classes: int) -> nn.Module:
    backbone = (fcn.VGG16Features(cfg.in_channels) if cfg.encoder_name is None
                else fcn.SmpFeatures(_encoder(cfg)))
    return fcn.FCN(backbone, classes, cfg.arch)


def _deeplab(cfg: SeedModelParams, classes: int) -> nn.Module:
    if cfg.kwargs.get("jpu", False):
        backbone = deeplab.JPU(_encoder(cfg))
    elif cfg.encoder_name is None:
        backbone = deeplab.AtrousVGG16(cfg.in_channels)
    else:
        backbone = deeplab.SmpAtrous(_encoder(cfg, deeplab.OUTPUT_STRIDE))
    return deeplab.DeepLab(backbone, classes, DEEPLAB_RATES[cfg.arch])


def _unet(cfg: SeedModelParams, classes: int) -> nn.Module:
    return unet.UNet(_encoder(cfg), classes,
                     upsampling_method=cfg.kwargs.get("upsampling", unet.DEFAULT_UPSAMPLING),
                     skip_merge=cfg.kwargs.get("skip_merge", unet.DEFAULT_SKIP_MERGE))


def _gated_scnn(cfg: SeedModelParams, classes: int) -> nn.Module:
    return gscnn.GatedSCNN(_encoder(cfg, gscnn.OUTPUT_STRIDE), classes)


def _pointrend(cfg: SeedModelParams, classes: int) -> nn.Module:
    return pointrend.PointRend(_encoder(cfg, pointrend.OUTPUT_STRIDE), classes, **cfg.kwargs)


_BUILDERS: dict[str, Callable[[SeedModelParams, int], nn.Module]] = {
    "fcn": _fcn,
    "deeplab": _deeplab,
    "UNet": _unet,
    "PointRend": _pointrend,
    "GatedSCNN": _gated_scnn,
    "SegNet": lambda cfg, classes: SegNet(cfg.in_channels, classes),
    "ENet": lambda cfg, classes: ENet(cfg.in_channels, classes),
    "fcdensenet": lambda cfg, classes: tiramisu.fc_densenet(
        cfg.arch, cfg.in_channels, classes, cfg.kwargs.get("memory_efficient", True)),
}

