"""Panoptic FPN (Kirillov et al. 2019): stuff and things from one network.

Arch ``panoptic_fpn_mobilenet_v2`` of family ``torchvision``. One backbone, the MobileNetV2
feature pyramid of ``pipeline.models.torchvision`` (maps of stride 8, 16 and 32, ImageNet
weights from ``$SEG_WEIGHTS_DIR``), feeds two branches trained together:

- Mask R-CNN's heads (RPN, box and mask heads) for the thing classes only
  (``meta.thing_classes``), numbered contiguously inside: thing k is torchvision's label k + 1;
- the paper's semantic branch (``SemanticFPNHead``) for the S stuff classes plus one 'thing'
  channel that stands for every thing class.

The images are resized by ``model.image_scale`` and padded as the instance model's are
(``FixedScaleTransform``); the semantic logits are upsampled bilinearly from the finest
map's stride to the resized image, and from there to the input's pixels at inference.
Splitting the two answers into one panoptic answer (things over stuff, overlaps and small
stuff regions removed) is the fusion step's job, not the network's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.model_params import PANOPTIC_ARCH, TorchvisionModelParams
from pipeline.models import torchvision as tv
from pipeline.models.base import ModelMeta, SegmentationModel

THING = -1                  # "semantic" in the answer: the semantic branch says some thing class
SEMANTIC_LOSS = "loss_semantic"     # the semantic branch's key in the training loss dict
SEMANTIC_CHANNELS = 128     # the paper's semantic branch width
GROUPS = 32                 # its GroupNorm groups
_VOID = -100                # F.cross_entropy's default ignore_index: void pixels once mapped to channels


class SemanticFPNHead(nn.Module):
    """The paper's semantic branch over FPN maps (finest first, each of stride twice the
    previous): from each map, stages of 3x3 conv + GroupNorm + ReLU + 2x bilinear upsampling,
    as many as it takes to reach the finest map's stride (the finest map gets one stage
    without upsampling); the results summed, then a 1x1 conv to ``classes`` logits.

    ``forward(maps)``: maps [(N, in_channels, H / 2**i, W / 2**i)] -> (N, classes, H, W).
    """

    def __init__(self, in_channels: int, levels: int, classes: int, channels: int = SEMANTIC_CHANNELS):
        super().__init__()
        self.levels = nn.ModuleList(_level(in_channels, channels, ups) for ups in range(levels))
        self.predictor = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.predictor(sum(level(m) for level, m in zip(self.levels, maps, strict=True)))


def _level(in_channels: int, channels: int, upsamplings: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for stage in range(max(upsamplings, 1)):
        layers += [nn.Conv2d(in_channels if stage == 0 else channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(GROUPS, channels), nn.ReLU(inplace=True)]
        if upsamplings:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


class PanopticModel(SegmentationModel):
    """Panoptic FPN behind the pipeline's conventions; classes are dataset class indices.

    Training: ``model(x, targets)`` with x (N, 3, H, W) normalised and per image {"boxes"
    (K, 4) x0 y0 x1 y1, "labels" (K,) class indices, "masks" (K, H, W) uint8, "semantic"
    (H, W) int64 class indices, ``meta.ignore_index`` for void} -> Mask R-CNN's five losses
    and ``SEMANTIC_LOSS``: cross-entropy of the semantic branch over the stuff classes and
    'thing' (every thing-class pixel), void left out, at the resized image's pixels. Segments
    of stuff classes among "boxes"/"labels"/"masks" are left out of Mask R-CNN's targets.
    Evaluation: ``model(x)`` -> per image {"boxes", "labels" (thing class indices), "scores",
    "masks" (K, 1, H, W) probabilities, "semantic" (H, W) int64: the semantic branch's
    argmax as a stuff class index, or ``THING``}, in the input's pixels.
    """

    def __init__(self, net: nn.Module, semantic_head: SemanticFPNHead, meta: ModelMeta, classes: int):
        super().__init__(net, meta)
        self.semantic_head = semantic_head
        self.classes = classes
        things = list(meta.thing_classes)
        stuff = [c for c in range(classes) if c not in things]
        channel = torch.full((classes,), len(stuff))          # thing classes -> the 'thing' channel
        channel[stuff] = torch.arange(len(stuff))
        label = torch.zeros(classes, dtype=torch.int64)       # stuff classes -> 0, torchvision's background
        label[things] = torch.arange(1, len(things) + 1)
        # Lookups, not weights: out of state_dict (persistent=False), moved with the model.
        lookups = {"class_channel": channel,                    # class -> semantic channel
                   "class_label": label,                        # class -> torchvision label
                   "thing_ids": torch.tensor(things),           # torchvision label - 1 -> class
                   "channel_ids": torch.tensor([*stuff, THING])}  # semantic channel -> class
        for name, lookup in lookups.items():
            self.register_buffer(name, lookup, persistent=False)

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("a Panoptic FPN in training mode needs targets")
        images = list(x)
        sizes = [tuple(image.shape[-2:]) for image in images]
        targets = [self._torchvision_target(t) for t in targets] if self.training else None
        batch, targets = self.net.transform(images, targets)
        features = self.net.backbone(batch.tensors)
        proposals, rpn_losses = self.net.rpn(batch, features, targets)
        detections, roi_losses = self.net.roi_heads(features, proposals, batch.image_sizes, targets)
        logits = F.interpolate(self.semantic_head([features[k] for k in tv.FPN_MAPS]),
                               size=batch.tensors.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            return {**rpn_losses, **roi_losses,
                    SEMANTIC_LOSS: _semantic_loss(logits, batch.image_sizes, targets)}
        detections = self.net.transform.postprocess(detections, batch.image_sizes, sizes)
        return [self._answer(d, image_logits, resized, size) for d, image_logits, resized, size
                in zip(detections, logits, batch.image_sizes, sizes, strict=True)]

    def _torchvision_target(self, target: dict) -> dict:
        """Labels as torchvision's (thing k -> k + 1; stuff segments dropped), "semantic" as
        channels (``_VOID`` for void)."""
        labels, semantic = target["labels"], target["semantic"]
        if bool(((labels < 0) | (labels >= self.classes)).any()):
            raise ValueError(f"targets: labels {sorted(set(labels.tolist()))} are not all class indices "
                             f"0..{self.classes - 1}")
        void = semantic == self.meta.ignore_index
        if not bool((void | ((semantic >= 0) & (semantic < self.classes))).all()):
            raise ValueError(f"targets: semantic holds values other than class indices 0..{self.classes - 1} "
                             f"and ignore_index {self.meta.ignore_index}")
        labels = self.class_label[labels]
        thing = labels > 0
        channels = self.class_channel[semantic.clamp(0, self.classes - 1)]
        return dict(target, boxes=target["boxes"][thing], labels=labels[thing], masks=target["masks"][thing],
                    semantic=torch.where(void, _VOID, channels))

    def _answer(self, detection: dict, logits: torch.Tensor, resized: tuple[int, int],
                size: tuple[int, int]) -> dict:
        h, w = resized
        logits = logits[:, :h, :w]
        if (h, w) != tuple(size):
            logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        return dict(detection, labels=self.thing_ids[detection["labels"] - 1],
                    semantic=self.channel_ids[logits.argmax(0)])


def _semantic_loss(logits: torch.Tensor, image_sizes: list[tuple[int, int]],
                   targets: list[dict]) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of the batch (0 when none is labelled);
    logits (N, S + 1, Hp, Wp) over the padded batch, each target's "semantic" its resized image's."""
    total = logits.new_zeros(())
    labelled = torch.zeros((), dtype=torch.int64, device=logits.device)
    for image_logits, (h, w), target in zip(logits, image_sizes, targets, strict=True):
        semantic = target["semantic"]
        total = total + F.cross_entropy(image_logits[None, :, :h, :w], semantic[None], ignore_index=_VOID,
                                        reduction="sum")
        labelled = labelled + (semantic != _VOID).sum()
    return total / labelled.clamp(min=1)


def build(cfg: TorchvisionModelParams, classes: int, meta: ModelMeta) -> PanopticModel:
    """Panoptic FPN for ``classes`` dataset classes, of which ``meta.thing_classes`` are things
    (at least one, and at least one class left as stuff); ``meta`` gets ImageNet normalisation
    unless it gives its own. Raises ``ValueError`` naming the key for bad thing classes or
    ``model.kwargs`` (MaskRCNN's, as for the instance archs)."""
    from torchvision.models.detection import MaskRCNN

    from pipeline.inference.panoptic_fusion import DEFAULT_MIN_SCORE

    things = _check_thing_classes(meta.thing_classes, classes)
    tv.check_kwargs(cfg, MaskRCNN)
    # The fusion pastes no instance scoring below its min score: computing its mask is waste.
    cfg = cfg.model_copy(update={"kwargs": {"box_score_thresh": DEFAULT_MIN_SCORE} | cfg.kwargs})
    net = tv.mobilenet_maskrcnn(cfg, len(things))
    net.transform = tv.fixed_scale_transform(cfg.image_scale)
    from pipeline.models.iou_balanced import keep_box_samples

    keep_box_samples(net)              # for loss.terms' iou_balanced_classifier
    head = SemanticFPNHead(net.backbone.out_channels, len(tv.FPN_MAPS), classes - len(things) + 1)
    return PanopticModel(net, head, tv.with_normalisation(cfg, meta), classes)


def _check_thing_classes(things: tuple[int, ...], classes: int) -> tuple[int, ...]:
    if not things:
        raise ValueError(f"thing_classes: {PANOPTIC_ARCH} needs the 0-based indices of the thing classes "
                         "(classes.json isthing); none given")
    outside = sorted(c for c in things if not 0 <= c < classes)
    if outside:
        raise ValueError(f"thing_classes: {outside} are not class indices of a model with {classes} classes "
                         f"(0..{classes - 1})")
    if len(set(things)) == classes:
        raise ValueError(f"thing_classes: all {classes} classes are things; {PANOPTIC_ARCH} needs at least "
                         "one stuff class (for things only use arch maskrcnn_mobilenet_v2_fpn)")
    return things
