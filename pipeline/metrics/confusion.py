"""Segmentation metrics from one confusion matrix: accumulate, then reduce.

Counts are summed over every batch of a split (and over every worker, with
``ConfusionMatrix.all_reduce``) and the scores are computed once from the sum, so
each pixel weighs the same wherever it fell; per-batch IoUs are never averaged.

Conventions, for every function here:
- Masks are (N, H, W) integer class indices in 0..num_classes-1; pixels whose truth is
  ``ignore_index`` (255 by default) are left out entirely, whatever was predicted there.
- The confusion matrix is (C, C) int64, rows = truth, columns = prediction.
- A class absent from both truth and prediction has no defined IoU or Dice: it scores
  NaN and is left out of the means (nanmean), rather than counting as 0 (which would
  punish a model for a class the split lacks) or 1 (which would flatter it).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

IGNORE_INDEX = 255


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel counts (C, C) int64 on ``target``'s device: [t, p] = pixels of truth t predicted p.

    pred, target: (N, H, W) (any shape, the same for both) integer class indices.
    ``ignore_index`` (None: none) marks target pixels to drop. Any other value outside
    0..num_classes-1, in either tensor, is an error rather than a miscount.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer class indices (take argmax of logits first)")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    outside = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bool(outside.any()):
        raise ValueError(f"class index outside 0..{num_classes - 1} (and not ignore_index={ignore_index})")
    # One bincount over the flattened (truth, prediction) pair index fills the whole matrix.
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_metrics(cm: torch.Tensor) -> dict[str, float | list[float]]:
    """Scores from a (C, C) confusion matrix (rows = truth, columns = prediction).

    Returns plain floats (per-class values as lists of C floats), all in [0, 1] or NaN:

    - ``pixel_accuracy``: correct / counted pixels.
    - ``iou`` per class, TP / (TP + FP + FN), and ``miou``, their mean.
    - ``dice`` per class, 2 TP / (2 TP + FP + FN), and ``mean_dice``.
    - ``fw_iou``: IoU weighted by each class's share of the truth pixels.
    - ``precision`` per class, TP / (TP + FP): NaN for a class never predicted.
    - ``recall`` per class, TP / (TP + FN): NaN for a class absent from the truth.

    IoU and Dice are NaN for a class absent from both truth and prediction, and the
    means skip NaN (nanmean); a class that occurs in only one of them scores 0 and
    counts. An empty matrix gives NaN everywhere.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square (C, C) matrix, got shape {tuple(cm.shape)}")
    cm = cm.detach().to("cpu", torch.float64)
    tp = cm.diagonal()
    truth = cm.sum(dim=1)      # TP + FN per class
    predicted = cm.sum(dim=0)  # TP + FP per class
    total = cm.sum()
    union = truth + predicted - tp
    # 0 / 0 gives NaN here, which is exactly "undefined" for each of these ratios.
    iou = tp / union
    dice = 2 * tp / (truth + predicted)
    precision = tp / predicted
    recall = tp / truth
    frequency = truth / total
    # A class with NaN IoU has no truth pixels, so its weight is 0: nansum drops it.
    fw_iou = torch.nansum(frequency * iou) if total > 0 else torch.tensor(math.nan)
    return {
        "pixel_accuracy": float(tp.sum() / total),
        "iou": iou.tolist(),
        "miou": float(torch.nanmean(iou)),
        "dice": dice.tolist(),
        "mean_dice": float(torch.nanmean(dice)),
        "fw_iou": float(fw_iou),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
    }


def collective_device(backend: str) -> torch.device:
    """Where a tensor must live for a collective of the process-group ``backend``
    (``dist.get_backend()``): NCCL reduces only CUDA tensors, on the current device
    (which Ray Train sets for each worker); gloo and MPI reduce CPU tensors."""
    return torch.device("cuda") if "nccl" in str(backend).lower() else torch.device("cpu")


class ConfusionMatrix:
    """Running confusion matrix over a split.

    ``update`` per batch, ``all_reduce`` once after the last batch when running
    distributed, then ``compute``. The counts start on ``device`` (CPU by default) and
    follow the batches' device.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                 device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        logits_or_pred: (N, C, H, W) float logits (argmax over C is taken) or
        (N, H, W) integer class indices; target: (N, H, W) integer, ``ignore_index``
        for unlabelled pixels.
        """
        pred = logits_or_pred
        if pred.is_floating_point():
            if pred.ndim != target.ndim + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits of shape {tuple(pred.shape)} do not give {self.num_classes} class scores "
                    f"per pixel of a target of shape {tuple(target.shape)}"
                )
            pred = pred.argmax(dim=1)
        batch = confusion_matrix(pred.detach(), target, self.num_classes, self.ignore_index)
        if self.mat.device != batch.device:
            self.mat = self.mat.to(batch.device)
        self.mat += batch

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks of the default process group; a no-op without one.

        Call it once, after the last update: each call adds every rank's counts again.
        The counts move first to the device the group's backend reduces on
        (``collective_device``), so that a rank that saw no batch, whose counts are
        still on the CPU, can join an NCCL reduction.
        """
        if dist.is_available() and dist.is_initialized():
            device = collective_device(dist.get_backend())
            if self.mat.device.type != device.type:
                self.mat = self.mat.to(device)
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, float | list[float]]:
        """``segmentation_metrics`` of the counts so far."""
        return segmentation_metrics(self.mat)

    def reset(self) -> None:
        self.mat.zero_()
