"""Loss terms built on distance transforms of the label map, and sensitivity-specificity.

Each is a ``Term`` (``pipeline/losses/terms.py``), so ignored pixels never count: the distance
transforms are of the target alone (an ignored pixel counts as another label, as in
``boundary_mask``), and the probabilities of ignored pixels are masked out before anything is
summed. Distance transforms are MONAI's (``monai.transforms.utils.distance_transform_edt``:
scipy on CPU), computed per image without a gradient.

- ``distance_ce``: cross-entropy weighted up near label edges, U-Net's weight map without its
  class balancing: ``w_p = 1 + w0 exp(-d_p^2 / (2 sigma^2))`` with ``d_p`` the Euclidean distance
  from p to the nearest edge pixel (``boundary_mask`` of width 1; an image without edges has
  ``w = 1``); ``sum_p w_p CE_p / sum_p w_p`` over labelled pixels.
- ``sensitivity_specificity`` (Brosch et al. 2015), per class one-vs-rest on the softmax
  probabilities p and the one-hot label g over labelled pixels, averaged over classes:
  ``r sum (g - p)^2 g / sum g + (1 - r) sum (g - p)^2 (1 - g) / sum (1 - g)``; a class absent
  from the batch (or covering all of it) adds 0 for the side it lacks.
- ``hausdorff``: MONAI's ``HausdorffDTLoss`` (Karimi and Salcudean 2019) over all classes,
  ``sum (p - g)^2 (dt_p^alpha + dt_g^alpha)`` with ``dt`` the distance of each pixel to the other
  side of the thresholded (> 0.5) map, per class, as a mean over labelled pixels and classes.
- ``surface``: Kervadec et al.'s boundary loss (2019) on the signed distance map phi of each
  class's label region (MONAI's ``BoundaryLoss.compute_distance_map``: negative inside, positive
  outside, 0 for a class absent from or filling the image): ``sum (p - g) phi`` over labelled
  pixels and classes, divided by their count. Shifted by the constant ``-sum g phi`` from the
  paper's ``sum p phi`` (the same gradient): 0 for a perfect prediction, positive otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import BoundaryLoss, HausdorffDTLoss
from monai.transforms.utils import distance_transform_edt
from torch import Tensor

from pipeline.losses.terms import Term, boundary_mask


def masked_one_hot(probabilities: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(probabilities, one-hot label, labelled mask), each (N, C, H, W) / (N, 1, H, W), with
    ignored pixels zero in both maps."""
    labelled = (target != ignore_index).unsqueeze(1)
    one_hot = F.one_hot(target.masked_fill(~labelled[:, 0], 0), probabilities.shape[1]).permute(0, 3, 1, 2)
    return probabilities * labelled, one_hot.to(probabilities.dtype) * labelled, labelled


@torch.no_grad()
def edge_distance(edges: Tensor) -> Tensor:
    """(N, H, W) bool edges -> (N, H, W) float: each pixel's Euclidean distance to the nearest
    edge pixel of its image; inf in an image without edges."""
    out = torch.full(edges.shape, float("inf"), device=edges.device)
    for i, image in enumerate(edges):
        if bool(image.any()):
            out[i] = torch.as_tensor(distance_transform_edt((~image)[None].cpu().numpy())[0], dtype=out.dtype)
    return out


class DistanceWeightedCrossEntropy(Term):
    def __init__(self, ignore_index: int, w0: float, sigma: float) -> None:
        super().__init__(ignore_index)
        self.w0, self.sigma = w0, sigma

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        edges = boundary_mask(target, logits.shape[1], self.ignore_index, 1)
        distance = edge_distance(edges).to(logits.dtype)
        weight = (1 + self.w0 * torch.exp(-distance**2 / (2 * self.sigma**2))) * (target != self.ignore_index)
        per_pixel = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        return (weight * per_pixel).sum() / weight.sum()


class SensitivitySpecificity(Term):
    def __init__(self, ignore_index: int, sensitivity_weight: float) -> None:
        super().__init__(ignore_index)
        self.r = sensitivity_weight

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        p, g, labelled = masked_one_hot(torch.softmax(logits, dim=1), target, self.ignore_index)
        error = (g - p) ** 2
        dims = (0, 2, 3)
        sensitivity = (error * g).sum(dims) / g.sum(dims).clamp(min=1)
        negatives = (1 - g) * labelled
        specificity = (error * negatives).sum(dims) / negatives.sum(dims).clamp(min=1)
        return (self.r * sensitivity + (1 - self.r) * specificity).mean()


class HausdorffDistanceLoss(Term):
    def __init__(self, ignore_index: int, alpha: float) -> None:
        super().__init__(ignore_index)
        self.monai = HausdorffDTLoss(alpha=alpha, include_background=True, batch=True)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        p, g, labelled = masked_one_hot(torch.softmax(logits, dim=1), target, self.ignore_index)
        # MONAI's mean is over every pixel (ignored ones add 0): rescaled to the labelled ones.
        return self.monai(p, g) * (labelled.numel() / labelled.sum())


class SurfaceLoss(Term):
    def __init__(self, ignore_index: int) -> None:
        super().__init__(ignore_index)
        self.monai = BoundaryLoss(include_background=True)

    def compute(self, logits: Tensor, target: Tensor) -> Tensor:
        p, g, labelled = masked_one_hot(torch.softmax(logits, dim=1), target, self.ignore_index)
        phi = self.monai.compute_distance_map(g).to(device=p.device, dtype=p.dtype)
        return ((p - g) * phi).sum() / (labelled.sum() * p.shape[1])
