"""IoU-balanced classification for Mask R-CNN's box head (Wu, Li and Wang, "IoU-balanced Loss
Functions for Single-stage Object Detection", 2019/2020), on torchvision's RoIHeads.

``SampleKeepingRoIHeads`` is torchvision's ``RoIHeads`` that, in training, also keeps (as
``box_samples``, taken by ``take_box_samples``) what the box classifier's loss is made of, per
sampled proposal: its cross-entropy ``ce`` (with the gradient), whether it is a positive
(matched to an object), and the IoU of its regressed box (for its true class) with the
object's box (no gradient). The loss dict itself stays torchvision's.

``iou_balanced_ce`` then weighs each positive's cross-entropy by ``iou ** eta``, normalised so
that the positives' total is what plain cross-entropy gives them (the paper's normalisation;
the factor carries no gradient), negatives by 1, and averages over the samples as
torchvision's ``loss_classifier`` does: with ``eta = 0`` (or equal IoUs) it is that loss.
Well-localised detections thus learn higher scores, which ranks them above poorly-localised
ones (AP at high IoU thresholds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

BOX_SAMPLES = "box_samples"        # {"ce", "positive", "iou"} per sampled proposal


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, 4) and (N, 4) x0 y0 x1 y1 -> (N,) IoU of each pair."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area - inter).clamp(min=1e-9)


def iou_balanced_ce(samples: dict[str, Tensor], eta: float) -> Tensor:
    """The IoU-balanced classification loss of ``BOX_SAMPLES`` (see the module doc)."""
    ce, positive, iou = samples["ce"], samples["positive"], samples["iou"]
    weight = torch.ones_like(ce)
    if bool(positive.any()):
        with torch.no_grad():
            raw = iou[positive].clamp(min=0) ** eta
            plain = ce[positive].detach()
            weight[positive] = raw * plain.sum() / (raw * plain).sum().clamp(min=1e-12)
    return (weight * ce).mean()


class SampleKeepingRoIHeads(RoIHeads):
    """torchvision's RoIHeads that keeps its last training step's ``box_samples``. It adds no
    parameters: ``keep_box_samples`` turns a built MaskRCNN's heads into one."""

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            self.box_samples = None          # a training step's samples do not outlive it
            return super().forward(features, proposals, image_shapes, targets)
        outputs = {}
        hook = self.box_predictor.register_forward_hook(lambda _m, _i, out: outputs.setdefault("box", out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
        proposals, _, labels, regression_targets = self._sampled
        del self._sampled
        class_logits, box_regression = outputs["box"]
        self.box_samples = box_samples(class_logits, box_regression, proposals, labels, regression_targets,
                                       self.box_coder)
        return result, losses


def box_samples(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], labels: list[Tensor],
                regression_targets: list[Tensor], box_coder) -> dict[str, Tensor]:
    """Per sampled proposal: cross-entropy, positive or not, and its regressed box's IoU with
    its object's box (decoded back from the regression targets)."""
    labels_all = torch.cat(labels)
    ce = F.cross_entropy(class_logits, labels_all, reduction="none")
    with torch.no_grad():
        boxes = torch.cat(proposals)
        predicted = box_coder.decode(box_regression.detach(), proposals)           # (N, classes, 4)
        predicted = predicted[torch.arange(len(labels_all), device=predicted.device), labels_all]
        truth = box_coder.decode_single(torch.cat(regression_targets), boxes)
        iou = paired_iou(predicted, truth)
    return {"ce": ce, "positive": labels_all > 0, "iou": iou}


def keep_box_samples(net) -> None:
    """Make a built torchvision MaskRCNN's ``roi_heads`` a ``SampleKeepingRoIHeads`` (torchvision
    builds its heads inside MaskRCNN; the subclass only adds behaviour, so the class is swapped)."""
    if not isinstance(net.roi_heads, RoIHeads):
        raise TypeError(f"roi_heads is a {type(net.roi_heads).__name__}, not torchvision's RoIHeads")
    net.roi_heads.__class__ = SampleKeepingRoIHeads


def take_box_samples(model) -> dict[str, Tensor]:
    """The ``box_samples`` of the training step ``model`` (an InstanceModel or PanopticModel,
    DDP-wrapped or not) just took, handed over once."""
    net = getattr(model, "module", model).net
    heads = net.roi_heads
    samples = getattr(heads, "box_samples", None)
    if samples is None:
        raise RuntimeError("the model's box head kept no samples: not a SampleKeepingRoIHeads in a "
                           "training step (keep_box_samples)")
    heads.box_samples = None
    return samples
