"""Family ``torchvision``: Mask R-CNN (He et al. 2017) for instance segmentation.

``maskrcnn_mobilenet_v2_fpn`` puts a feature pyramid over three stages of a MobileNetV2
(strides 8, 16 and 32: nuclei of 10-40 px need the stride-8 map) whose ImageNet weights
are the verified file in ``$SEG_WEIGHTS_DIR``, with frozen BatchNorm (batches of a few
images cannot estimate its statistics); its anchor generator and RoI poolers are sized to
those maps (torchvision's defaults expect the ResNet FPN's five). The ResNet-50 variants
are torchvision's own builders with random weights: ``weights=None, weights_backbone=None``
always, so no builder ever tries to download.

Whatever the backbone, the network sees images as the pipeline prepares them: normalised
with ``meta.mean``/``meta.std`` by the caller, and resized by one fixed factor,
``model.image_scale``, for training crops and whole images alike (torchvision's own
transform would resize each image to a minimum side, so a crop and the whole image it came
from would be seen at different scales). Classes are 0-based here as everywhere in the
pipeline; torchvision's background class 0 stays inside ``InstanceModel``.

``panoptic_fpn_mobilenet_v2`` (Panoptic FPN: this Mask R-CNN for the thing classes beside a
semantic branch on the same FPN) is built by ``pipeline.models.panoptic_fpn`` from the
pieces here.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import paths
from pipeline.config.model_params import PANOPTIC_ARCH, TorchvisionModelParams
from pipeline.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegmentationModel
from pipeline.models.weights import ENCODER_WEIGHT_FILES, WeightsUnavailableError, read_encoder_weights

BACKBONE_WEIGHTS = "mobilenet_v2"           # the key of its file in ENCODER_WEIGHT_FILES
MOBILENET_STAGES = (2, 3, 4)                # stages whose outputs the FPN takes: strides 8, 16, 32
FPN_MAPS = tuple(str(k) for k in range(len(MOBILENET_STAGES)))  # the FPN's maps of those stages, finest first
ANCHOR_SIZES = ((16,), (32,), (64,), (128,))  # one per FPN map (three stages + the max-pooled level)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Keys the family sets itself; model.kwargs must not repeat them.
_OWN_KEYS = ("num_classes", "min_size", "max_size", "image_mean", "image_std", "rpn_anchor_generator",
             "box_roi_pool", "mask_roi_pool", "weights", "weights_backbone", "trainable_backbone_layers")


def fixed_scale_transform(scale: float) -> nn.Module:
    """``FixedScaleTransform(scale)``, the detection transform every model of the family uses."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    class FixedScaleTransform(GeneralizedRCNNTransform):
        """torchvision's detection transform with one fixed resize factor and no
        normalisation (the inputs come normalised). A target's instance masks and its
        ``semantic`` map (H, W) of class indices, if any, are resized with the image
        (nearest)."""

        def __init__(self, scale: float):
            super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
            self.scale = float(scale)

        def normalize(self, image: torch.Tensor) -> torch.Tensor:
            return image

        def resize(self, image, target=None):
            if self.scale == 1.0:
                return image, target
            h, w = image.shape[-2:]
            image = F.interpolate(image[None], scale_factor=self.scale, mode="bilinear",
                                  recompute_scale_factor=True, align_corners=False)[0]
            if target is not None:
                size = image.shape[-2:]
                target = dict(target, boxes=resize_boxes(target["boxes"], (h, w), size))
                if "masks" in target:
                    target["masks"] = _resize_nearest(target["masks"], size)
                if "semantic" in target:
                    target["semantic"] = _resize_nearest(target["semantic"][None], size)[0]
            return image, target

    return FixedScaleTransform(scale)


def _resize_nearest(labels: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(K, H, W) integer maps (masks, class indices below 2**24) resized to ``size``, nearest."""
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
    return resized.to(labels.dtype)


class InstanceModel(SegmentationModel):
    """Mask R-CNN behind the pipeline's conventions.

    Training: ``model(x, targets)`` with x (N, 3, H, W) normalised and per image
    {"boxes" (K, 4) x0 y0 x1 y1, "labels" (K,) 0-based, "masks" (K, H, W) uint8} -> the dict
    of Mask R-CNN's losses. Evaluation: ``model(x)`` -> per image {"boxes", "labels"
    (0-based), "scores", "masks" (K, 1, H, W) probabilities}, in the input's pixels.
    """

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None):
        images = list(x)
        if self.training:
            if targets is None:
                raise ValueError("a Mask R-CNN in training mode needs targets")
            return self.net(images, [dict(t, labels=t["labels"] + 1) for t in targets])
        return [dict(o, labels=o["labels"] - 1) for o in self.net(images)]


def build(cfg: TorchvisionModelParams, classes: int, meta: ModelMeta) -> SegmentationModel:
    """Mask R-CNN with ``classes`` object classes (plus torchvision's background); ``meta``
    gets ImageNet normalisation unless it gives its own. Raises ``ValueError`` naming the key
    for a ``model.kwargs`` entry MaskRCNN does not take or that the family sets itself."""
    from torchvision.models.detection import MaskRCNN

    if cfg.arch == PANOPTIC_ARCH:
        from pipeline.models import panoptic_fpn

        return panoptic_fpn.build(cfg, classes, meta)
    check_kwargs(cfg, MaskRCNN)
    if cfg.arch == "maskrcnn_mobilenet_v2_fpn":
        net = mobilenet_maskrcnn(cfg, classes)
    else:
        from torchvision.models import detection

        builder = getattr(detection, cfg.arch)
        net = builder(weights=None, weights_backbone=None, num_classes=classes + 1,
                      trainable_backbone_layers=cfg.trainable_layers, **cfg.kwargs)
    net.transform = fixed_scale_transform(cfg.image_scale)
    from pipeline.models.iou_balanced import keep_box_samples

    keep_box_samples(net)              # for loss.terms' iou_balanced_classifier
    return InstanceModel(net, with_normalisation(cfg, meta))


def with_normalisation(cfg: TorchvisionModelParams, meta: ModelMeta) -> ModelMeta:
    """``meta`` with the family's normalisation unless it gives its own."""
    if meta.mean is not None:
        return meta
    mean, std = normalisation(cfg)
    return replace(meta, mean=mean, std=std)


def mobilenet_maskrcnn(cfg: TorchvisionModelParams, classes: int) -> nn.Module:
    """Mask R-CNN with ``classes`` object classes (plus background) over the MobileNetV2 FPN
    (maps ``FPN_MAPS`` and a max-pooled level), ImageNet weights per ``cfg.encoder_weights``."""
    from torchvision.models import mobilenet_v2
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    net = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if cfg.encoder_weights is not None:
        folder = paths.weights_dir()
        if folder is None:
            raise WeightsUnavailableError(_no_weights_dir_message())
        state = read_encoder_weights(BACKBONE_WEIGHTS, folder)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            file = ENCODER_WEIGHT_FILES[BACKBONE_WEIGHTS].name
            raise RuntimeError(f"{file} does not fit MobileNetV2: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    backbone = _mobilenet_extractor(net, fpn=True, trainable_layers=cfg.trainable_layers,
                                    returned_layers=list(MOBILENET_STAGES))
    maps = list(FPN_MAPS)
    anchors = AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=(ASPECT_RATIOS,) * len(ANCHOR_SIZES))
    return MaskRCNN(
        backbone, num_classes=classes + 1, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=maps, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=maps, output_size=14, sampling_ratio=2),
        **cfg.kwargs,
    )


def check_kwargs(cfg: TorchvisionModelParams, maskrcnn: type) -> None:
    """``model.kwargs`` are MaskRCNN's keyword arguments, none the family sets itself."""
    own = sorted(set(cfg.kwargs) & set(_OWN_KEYS))
    if own:
        raise ValueError(f"model.kwargs: {', '.join(own)} set by the torchvision family itself "
                         "(use model.classes, model.image_scale, model.trainable_layers)")
    accepted = set(inspect.signature(maskrcnn.__init__).parameters) - {"self", "backbone", "kwargs"}
    # MaskRCNN passes **kwargs on to FasterRCNN, which takes the RPN and box-head keys.
    from torchvision.models.detection import FasterRCNN

    accepted |= set(inspect.signature(FasterRCNN.__init__).parameters) - {"self", "backbone", "kwargs"}
    unknown = sorted(set(cfg.kwargs) - accepted)
    if unknown:
        raise ValueError(f"model.kwargs: {', '.join(map(repr, unknown))} not taken by torchvision's "
                         "MaskRCNN; "
                         f"accepted: {', '.join(sorted(accepted - set(_OWN_KEYS)))}")


def normalisation(cfg: TorchvisionModelParams) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's: the statistics torchvision's backbones were trained with."""
    return IMAGENET_MEAN, IMAGENET_STD


def ensure_weights(cfg: TorchvisionModelParams) -> None:
    """Before any worker starts: the MobileNetV2 weights file is in ``$SEG_WEIGHTS_DIR``
    and verified (this family downloads nothing)."""
    if cfg.encoder_weights is None:
        return
    from pipeline.models.weights import WeightsChecksumError, weights_file

    folder = paths.weights_dir()
    if folder is None:
        raise WeightsUnavailableError(_no_weights_dir_message())
    try:
        weights_file(BACKBONE_WEIGHTS, folder)
    except (ValueError, OSError, WeightsChecksumError) as exc:
        raise WeightsUnavailableError(str(exc)) from exc


def _no_weights_dir_message() -> str:
    file = ENCODER_WEIGHT_FILES[BACKBONE_WEIGHTS].name
    return (f"model.encoder_weights: imagenet for {BACKBONE_WEIGHTS} needs ${paths.ENV_WEIGHTS_DIR}, "
            "a folder "
            f"holding {file} (torchvision's ImageNet checkpoint); the torchvision family downloads "
            "nothing. Set the variable, or model.encoder_weights: null")
