"""PointRend for semantic segmentation (Kirillov, Wu, He and Girshick, "PointRend: Image
Segmentation as Rendering", 2020): a coarse prediction refined at its most uncertain points by
a small MLP, the point head, that reads fine-grained features there.

- Coarse: an smp encoder at output stride 8 (its last stages dilated, as DeepLab's) and an
  atrous head (3x3, dilation 12, 256 channels, then the class scores): logits at stride 8.
- Fine-grained features: the encoder's stride-4 map, bilinearly sampled at each point.
- Point head: three 1x1 layers (``Conv1d``) of 256 channels over the fine features and the
  coarse logits at the point, the coarse logits concatenated again before each layer, then
  the class scores of the point.
- Training (``TrainingOutput``): the coarse logits, upsampled, go to the pipeline's loss as
  any net's; the point head is trained on ``TRAIN_POINTS`` points per image chosen as the
  paper does: ``OVERSAMPLE`` times as many random points, of which the ``IMPORTANCE`` share
  with the most uncertain coarse prediction (smallest gap between the two top logits), plus
  random ones; their cross-entropy against the labels at those points (nearest) is added.
- Inference (eval mode): the coarse logits are doubled three times (bilinear) up to the input
  size; after each doubling the ``SUBDIVISION_POINTS`` most uncertain cells are predicted
  again by the point head, whose values replace them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.base import TrainingOutput

OUTPUT_STRIDE = 8
SUBDIVISIONS = 3                   # doublings from stride 8 to the input size
FINE_LEVEL = 2                     # smp encoders' features: [input, /2, /4, /8, /16, /32]
HEAD_CHANNELS = 256
COARSE_DILATION = 12
POINT_LAYERS = 3
TRAIN_POINTS, OVERSAMPLE, IMPORTANCE = 2048, 3, 0.75     # the paper's semantic settings
SUBDIVISION_POINTS = 8192


def point_sample(maps: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``maps`` (N, C, H, W) at ``points`` (N, P, 2), each (x, y) in [0, 1] of the map's extent
    -> (N, C, P)."""
    grid = (2 * points - 1).unsqueeze(2)                    # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(maps, grid, mode=mode, align_corners=False).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Minus the gap between the two largest logits, per position (dim 1 is the classes): the
    least certain positions score highest."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def training_points(coarse: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` points per image (N, n, 2): the ``IMPORTANCE`` share the most uncertain of
    ``OVERSAMPLE * n`` random ones, the rest random. No gradient flows through the choice."""
    batch = coarse.shape[0]
    candidates = torch.rand(batch, OVERSAMPLE * n, 2, device=coarse.device)
    scores = uncertainty(point_sample(coarse, candidates))           # (N, OVERSAMPLE * n)
    important = int(IMPORTANCE * n)
    index = scores.topk(important, dim=1).indices
    chosen = candidates.gather(1, index.unsqueeze(2).expand(-1, -1, 2))
    return torch.cat([chosen, torch.rand(batch, n - important, 2, device=coarse.device)], dim=1)


def uncertain_cells(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` most uncertain cells of (N, C, H, W) ``logits``: their flat indices (N, n) and
    their centres (N, n, 2) as (x, y) in [0, 1]."""
    h, w = logits.shape[-2:]
    index = uncertainty(logits).flatten(1).topk(min(n, h * w), dim=1).indices
    # Each cell's centre looked up, not computed from the index (ONNX's exporter takes no
    # remainder by a symbolic width).
    xs = (torch.arange(w, device=logits.device, dtype=logits.dtype) + 0.5) / w
    ys = (torch.arange(h, device=logits.device, dtype=logits.dtype) + 0.5) / h
    centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    return index, centres[index]


class PointHead(nn.Module):
    """The MLP over (fine features, coarse logits) at each point -> the point's class scores."""

    def __init__(self, fine_channels: int, classes: int):
        super().__init__()
        widths = [fine_channels + classes] + [HEAD_CHANNELS + classes] * POINT_LAYERS
        self.layers = nn.ModuleList(nn.Conv1d(widths[i], HEAD_CHANNELS, 1) for i in range(POINT_LAYERS))
        self.predictor = nn.Conv1d(widths[-1], classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = fine
        for layer in self.layers:
            x = F.relu(layer(torch.cat([x, coarse], dim=1)))
        return self.predictor(torch.cat([x, coarse], dim=1))


class PointRend(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, encoder: nn.Module, classes: int, train_points: int = TRAIN_POINTS,
                 subdivision_points: int = SUBDIVISION_POINTS):
        super().__init__()
        self.encoder = encoder
        self.coarse_head = nn.Sequential(
            nn.Conv2d(encoder.out_channels[-1], HEAD_CHANNELS, 3, padding=COARSE_DILATION,
                      dilation=COARSE_DILATION, bias=False),
            nn.BatchNorm2d(HEAD_CHANNELS), nn.ReLU(inplace=True), nn.Conv2d(HEAD_CHANNELS, classes, 1))
        self.point_head = PointHead(encoder.out_channels[FINE_LEVEL], classes)
        self.train_points, self.subdivision_points = train_points, subdivision_points

    def forward(self, x: torch.Tensor) -> torch.Tensor | TrainingOutput:
        features = self.encoder(x)
        fine, coarse = features[FINE_LEVEL], self.coarse_head(features[-1])
        if self.training:
            return self._training(x, fine, coarse)
        logits = coarse
        for _ in range(SUBDIVISIONS):
            logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
            index, points = uncertain_cells(logits, self.subdivision_points)
            refined = self.point_head(point_sample(fine, points), point_sample(coarse, points))
            n, c, h, w = logits.shape
            index = index.unsqueeze(1).expand(-1, c, -1)
            logits = logits.flatten(2).scatter(2, index, refined).view(n, c, h, w)
        return logits

    def _training(self, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor) -> TrainingOutput:
        with torch.no_grad():
            points = training_points(coarse, self.train_points)
        point_logits = self.point_head(point_sample(fine, points), point_sample(coarse, points))
        logits = F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=False)

        def point_loss(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
            labels = point_sample(targets.unsqueeze(1).float(), points, mode="nearest").squeeze(1).long()
            summed = F.cross_entropy(point_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
            return summed / (labels != ignore_index).sum().clamp(min=1)     # 0, not NaN, if all are ignored

        return TrainingOutput(logits, point_loss)
