"""Segmentation losses: a weighted sum of named terms, built from the ``loss`` section of params.

Every term maps logits ``(N, C, H, W)`` float and a target ``(N, H, W)`` int64 (class
indices in ``0..C-1``, or ``ignore_index`` for unlabelled pixels) to a scalar, and
ignored pixels never count: changing the logits there changes neither the loss nor
any gradient, and their own gradient is exactly zero.

How segmentation-models-pytorch 0.6.0 treats ``ignore_index`` (read in its source and
checked in tests/losses/test_losses.py, for 255 and for an index equal to C like CamVid's 11):

- ``DiceLoss``, ``JaccardLoss``, ``TverskyLoss`` (multiclass) map ignored targets to
  class 0 before ``one_hot`` (so an index >= C is fine), then multiply both the
  probabilities and the one-hot target by the labelled mask; ``FocalLoss`` and
  ``LovaszLoss`` drop ignored pixels by boolean indexing. For finite logits all are
  correct: the value ignores those pixels and their gradient is exactly 0.
- A non-finite logit at an ignored pixel (an fp16 overflow, say) still leaks in: NaN
  * 0 makes Dice, Jaccard and Tversky NaN, and Lovasz (like torch's ``cross_entropy``)
  gives the right value but a NaN gradient there.
- A batch with no labelled pixel at all gives NaN from ``FocalLoss`` (and from torch's
  ``cross_entropy``), and an empty ``(0, C)`` tensor instead of a scalar from ``LovaszLoss``.

So every term runs behind ``Term.forward``, which fills the logits of ignored pixels
with 0 (masked_fill also passes back a zero gradient there) and answers a zero that
keeps the graph when nothing is labelled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import (
    MULTICLASS_MODE,
    DiceLoss,
    FocalLoss,
    JaccardLoss,
    LovaszLoss,
    TverskyLoss,
)
from torch import Tensor, nn

from pipeline.config.params import INSTANCE_LOSS_NAMES, IOU_BALANCED_LOSS, LOSS_NAMES, LossParams


class Term(nn.Module):
    """One loss term. Subclasses implement ``compute``; ``forward`` guards the ignore pixels."""

    def __init__(self, ignore_index: int) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits: (N, C, H, W) float; target: (N, H, W) int64, ``ignore_index`` = unlabelled.

        Returns a scalar float32 (float64 for float64 logits); 0 with a graph when no pixel
        is labelled.
        """
        check_inputs(logits, target)
        ignored = target == self.ignore_index
        # Half-precision logits (autocast) are lifted to float32: sums over a whole batch
        # of pixels lose too much in float16.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits = logits.masked_fill(ignored.unsqueeze(1), 0.0)
        if bool(ignored.all()):
            return logits.sum() * 0.0
        return self.compute(logits, target)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss, given at least one labelled pixel and zeros in ignored logits."""
        raise NotImplementedError


class CrossEntropy(Term):
    """Mean cross-entropy over labelled pixels; with ``weight`` (one per class):
    ``sum_p w[y_p] * nll_p / sum_p w[y_p]``, torch's weighted mean."""

    def __init__(self, ignore_index: int, weight: Tensor | None = None) -> None:
        super().__init__(ignore_index)
        self.register_buffer("weight", weight)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)


class SmpTerm(Term):
    """One of smp's multiclass losses, given the same ``ignore_index``, behind the guard."""

    def __init__(self, loss: nn.Module, ignore_index: int) -> None:
        super().__init__(ignore_index)
        self.smp_loss = loss

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.smp_loss(logits, target)


class TopKCrossEntropy(Term):
    """Mean cross-entropy of the hardest labelled pixels of the batch.

    With n labelled pixels in the whole batch, the k = ceil(fraction * n) largest
    per-pixel cross-entropies are averaged; the others get no gradient.
    """

    def __init__(self, ignore_index: int, fraction: float) -> None:
        super().__init__(ignore_index)
        self.fraction = fraction

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        per_pixel = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        labelled = per_pixel[target != self.ignore_index]
        return labelled.topk(top_count(self.fraction, labelled.numel())).values.mean()


def top_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), at least 1; the tolerance keeps 0.07 * 100 (= 7.000000000000001) at 7."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


class BoundaryCrossEntropy(Term):
    """Mean cross-entropy over the labelled pixels near a label edge of the target.

    The band is ``boundary_mask(target, C, ignore_index, width)``: labelled pixels p
    with some pixel q != label(p) within Chebyshev distance ``width`` of p, inside the
    image (an ignore pixel counts as a different label, so the outline of a void
    region, such as the object contours VOC marks 255, is an edge; the image border is
    not). The loss is ``sum_{p in band} CE_p / |band|``; pixels outside the band and
    ignored pixels get no gradient. A batch with an empty band gives 0 with a graph.
    """

    def __init__(self, ignore_index: int, width: int) -> None:
        super().__init__(ignore_index)
        self.width = width

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        band = boundary_mask(target, logits.shape[1], self.ignore_index, self.width)
        if not bool(band.any()):
            return logits.sum() * 0.0
        per_pixel = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        return per_pixel[band].mean()


def boundary_mask(target: Tensor, num_classes: int, ignore_index: int, width: int) -> Tensor:
    """Labelled pixels within ``width`` of a pixel of another label: (N, H, W) bool.

    target: (N, H, W) int64. The morphological gradient (dilation minus erosion, over a
    (2 * width + 1)^2 window) of the one-hot target is non-zero at p exactly when the
    window holds a pixel outside p's class, so the erosion alone decides: p is inside
    its region when the eroded one-hot is still 1 in p's class. Ignored pixels have an
    all-zero one-hot, so they erode their neighbours like any other label.
    """
    labelled = target != ignore_index
    onehot = F.one_hot(target.masked_fill(~labelled, 0), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.float() * labelled.unsqueeze(1)
    # Erosion as -maxpool(-x): max_pool2d pads with -inf, so outside the image erodes nothing.
    eroded = -F.max_pool2d(-onehot, kernel_size=2 * width + 1, stride=1, padding=width)
    interior = (onehot * eroded).sum(dim=1) > 0
    return labelled & ~interior


def check_inputs(logits: Tensor, target: Tensor) -> None:
    """Raise ValueError unless logits is (N, C, H, W) float and target (N, H, W) int64."""
    if logits.ndim != 4 or not logits.is_floating_point():
        raise ValueError(f"logits must be (N, C, H, W) float, got {tuple(logits.shape)} {logits.dtype}")
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w) or target.dtype != torch.int64:
        raise ValueError(
            f"target must be (N, H, W) = {(n, h, w)} int64 for logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)} {target.dtype}"
        )


class CompositeLoss(nn.Module):
    """``sum_name weight[name] * term[name](logits, target)``: a scalar."""

    def __init__(self, terms: dict[str, tuple[float, Term]]) -> None:
        super().__init__()
        self.weights = {name: float(w) for name, (w, _) in terms.items()}
        self.losses = nn.ModuleDict({name: term for name, (_, term) in terms.items()})

    @property
    def terms(self) -> dict[str, tuple[float, Term]]:
        """name -> (weight, term module), in the order of params."""
        return {name: (self.weights[name], term) for name, term in self.losses.items()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits: (N, C, H, W) float; target: (N, H, W) int64 with ignore pixels. A scalar."""
        return sum(self.weights[name] * term(logits, target) for name, term in self.losses.items())

    @torch.no_grad()
    def components(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        """Each term's unweighted value, for logging; the loss is sum(weight * value)."""
        return {name: float(term(logits, target)) for name, term in self.losses.items()}


def build_term(name: str, cfg: LossParams, ignore_index: int, weight: Tensor | None) -> Term:
    """The term called ``name`` (one of ``LOSS_NAMES``) with its settings from ``cfg``."""
    match name:
        case "ce":
            return CrossEntropy(ignore_index)
        case "weighted_ce":
            if weight is None:
                raise ValueError("loss term weighted_ce needs class weights (loss.class_weights)")
            return CrossEntropy(ignore_index, weight)
        case "focal":
            return SmpTerm(FocalLoss(MULTICLASS_MODE, gamma=cfg.focal_gamma, ignore_index=ignore_index),
                           ignore_index)
        case "dice":
            return SmpTerm(DiceLoss(MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index),
                           ignore_index)
        case "jaccard":
            return SmpTerm(JaccardLoss(MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index),
                           ignore_index)
        case "lovasz":
            return SmpTerm(LovaszLoss(MULTICLASS_MODE, ignore_index=ignore_index), ignore_index)
        case "tversky":
            tversky = TverskyLoss(MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index,
                                  alpha=cfg.tversky_alpha, beta=cfg.tversky_beta)
            return SmpTerm(tversky, ignore_index)
        case "topk":
            return TopKCrossEntropy(ignore_index, cfg.topk_fraction)
        case "boundary":
            return BoundaryCrossEntropy(ignore_index, cfg.boundary_width)
    from pipeline.losses import distance  # it builds on Term and boundary_mask from here

    match name:
        case "distance_ce":
            return distance.DistanceWeightedCrossEntropy(ignore_index, cfg.distance_w0, cfg.distance_sigma)
        case "sensitivity_specificity":
            return distance.SensitivitySpecificity(ignore_index, cfg.sensitivity_weight)
        case "hausdorff":
            return distance.HausdorffDistanceLoss(ignore_index, cfg.hausdorff_alpha)
        case "surface":
            return distance.SurfaceLoss(ignore_index)
    if name in (*INSTANCE_LOSS_NAMES, IOU_BALANCED_LOSS):
        raise ValueError(f"loss.terms: {name!r} weighs a Mask R-CNN loss of the instance task; semantic "
                         f"segmentation takes {', '.join(LOSS_NAMES)}")
    raise ValueError(f"unknown loss term {name!r} in loss.terms; known: {', '.join(LOSS_NAMES)}")


def build_loss(
    cfg: LossParams, num_classes: int, ignore_index: int, class_weights: list[float] | None = None,
) -> CompositeLoss:
    """The weighted sum of ``cfg.terms``.

    class_weights: one per class, already resolved (see ``resolve_class_weights``);
    used by weighted_ce only. ignore_index: the target value of unlabelled pixels
    (255, or e.g. 11 == num_classes for CamVid).
    """
    weight = None
    if class_weights is not None:
        if len(class_weights) != num_classes:
            raise ValueError(
                f"loss.class_weights has {len(class_weights)} values, the dataset has {num_classes} classes"
            )
        weight = torch.tensor(class_weights, dtype=torch.float32)
    return CompositeLoss({
        name: (w, build_term(name, cfg, ignore_index, weight)) for name, w in cfg.terms.items()
    })


def resolve_class_weights(cfg: LossParams, card: dict, num_classes: int) -> list[float] | None:
    """``cfg.class_weights`` as one float per class: the list itself, the scheme's list from
    the dataset card (``card["train_statistics"]["weights"][scheme]``), or None."""
    given = cfg.class_weights
    if given is None:
        return None
    if isinstance(given, str):
        schemes = card.get("train_statistics", {}).get("weights", {})
        if given not in schemes:
            raise ValueError(
                f"loss.class_weights: scheme {given!r} is not in the dataset card "
                f"(train_statistics.weights has: {', '.join(schemes) or 'nothing'})"
            )
        weights, source = schemes[given], f"the card's {given!r} weights"
    else:
        weights, source = given, "the list"
    if len(weights) != num_classes:
        raise ValueError(
            f"loss.class_weights: {source} has {len(weights)} values, the dataset has {num_classes} classes"
        )
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"loss.class_weights: {source} must be non-negative, not all zero (got {weights})")
    return [float(w) for w in weights]
