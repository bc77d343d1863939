"""Gated-SCNN (Takikawa, Acuna, Jampani and Fidler, "Gated-SCNN: Gated Shape CNNs for Semantic
Segmentation", 2019): a shape stream beside the regular one that predicts class boundaries,
gated by the regular stream's deeper features, and a dual-task loss.

- Regular stream: an smp encoder at output stride 8 (dilated, as DeepLab's) and an atrous
  spatial pyramid (1x1, 3x3 dilated 12 and 24, image pooling) that also takes the shape
  stream's boundary map as one more branch (the paper's fusion), then the class scores,
  upsampled 8 times.
- Shape stream, at stride 4: the encoder's stride-4 map, then three times a residual block and a
  gated convolutional layer (GCL) whose attention map, sigmoid(1x1 conv(shape ‖ regular)), comes
  from the shape features and the encoder's stride-8, 16 and 32 maps in turn (each reduced to
  one channel): ``shape * (1 + attention)``, then a 1x1 convolution. Its boundary logits (one
  channel) are upsampled to the input size. (The paper also concatenates the image's Canny
  edges before the fusion; left out here: not differentiable, nor exportable.)
- Dual-task loss (``TrainingOutput``), added to the recipe's loss of the class scores:
  ``EDGE_WEIGHT`` x a class-balanced binary cross-entropy of the boundary logits against the
  label edges (labelled pixels whose 3x3 window holds another labelled class), plus the
  regulariser's two terms, each weighted ``REGULARISER_WEIGHT``: the boundaries of the
  predicted segmentation held to the label's (``boundary_consistency``: the spatial gradient
  magnitude of each class's soft map, softmax at temperature ``TAU``, against that of the
  label's one-hot map, L1 over the pixels where either has a boundary; the paper's Gumbel
  noise is left out, so that the loss is deterministic), and cross-entropy of the class scores
  on the pixels the shape stream is sure are boundaries (probability above ``EDGE_THRESHOLD``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.base import TrainingOutput

OUTPUT_STRIDE = 8
SHAPE_LEVEL = 2                       # the encoder's stride-4 map feeds the shape stream
GATE_LEVELS = (3, 4, 5)               # its stride-8, 16 and 32 maps gate it
SHAPE_CHANNELS = 32
ASPP_CHANNELS = 256
ASPP_RATES = (12, 24)                 # at output stride 8
EDGE_WEIGHT, REGULARISER_WEIGHT, EDGE_THRESHOLD = 20.0, 1.0, 0.8    # the paper's
TAU = 1.0                             # the soft argmax's temperature in boundary_consistency


def label_edges(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N, H, W) bool: labelled pixels whose 3x3 window holds another labelled class (ignored
    pixels, padding included, draw no edges)."""
    labelled = targets != ignore_index
    values = targets.float().unsqueeze(1)
    high = F.max_pool2d(values.masked_fill(~labelled.unsqueeze(1), float("-inf")), 3, stride=1, padding=1)
    low = -F.max_pool2d((-values).masked_fill(~labelled.unsqueeze(1), float("-inf")), 3, stride=1, padding=1)
    return labelled & (high != low).squeeze(1)


def gradient_magnitude(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): the Sobel gradient's magnitude of each map (a unit step
    gives 1/2 on each side of it), replicating the border so that the frame draws no edge."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=maps.device) / 8
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1).repeat(maps.shape[1], 1, 1, 1)
    padded = F.pad(maps, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels.to(maps.dtype), groups=maps.shape[1])
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return torch.sqrt(gx * gx + gy * gy + 1e-12)


def boundary_consistency(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean L1 distance between the boundaries of the predicted segmentation (the gradient
    magnitude of each class's softmax(logits / ``TAU``)) and the label's (the same of its one-hot
    map), over the pixels and classes where either draws a boundary; pixels within one of an
    ignored one are left out (their label map has no value to differ from)."""
    labelled = targets != ignore_index
    near_ignored = F.max_pool2d((~labelled).float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0
    valid = (labelled & ~near_ignored).unsqueeze(1)
    one_hot = F.one_hot(targets.masked_fill(~labelled, 0), logits.shape[1]).permute(0, 3, 1, 2)
    predicted = gradient_magnitude(torch.softmax(logits / TAU, dim=1))
    label = gradient_magnitude((one_hot * labelled.unsqueeze(1)).to(logits.dtype))
    either = valid & ((predicted.detach() > 1e-3) | (label > 1e-3))
    return ((predicted - label).abs() * either).sum() / either.sum().clamp(min=1)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(channels, channels, 3),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class GatedConv(nn.Module):
    """The GCL: an attention map from the shape features and one regular-stream channel."""

    def __init__(self, channels: int):
        super().__init__()
        joint = channels + 1
        self.attention = nn.Sequential(nn.BatchNorm2d(joint), nn.Conv2d(joint, joint, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(joint, 1, 1), nn.BatchNorm2d(1),
                                       nn.Sigmoid())
        self.out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, shape: torch.Tensor, regular: torch.Tensor) -> torch.Tensor:
        attention = self.attention(torch.cat([shape, regular], dim=1))
        return self.out(shape * (attention + 1))


class ShapeStream(nn.Module):
    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Conv2d(channels[SHAPE_LEVEL], SHAPE_CHANNELS, 1)
        self.regular = nn.ModuleList(nn.Conv2d(channels[level], 1, 1) for level in GATE_LEVELS)
        self.blocks = nn.ModuleList(ResidualBlock(SHAPE_CHANNELS) for _ in GATE_LEVELS)
        self.gates = nn.ModuleList(GatedConv(SHAPE_CHANNELS) for _ in GATE_LEVELS)
        self.edge = nn.Conv2d(SHAPE_CHANNELS, 1, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Boundary logits (N, 1, H/4, W/4)."""
        shape = self.stem(features[SHAPE_LEVEL])
        size = shape.shape[-2:]
        for level, reduce, block, gate in zip(GATE_LEVELS, self.regular, self.blocks, self.gates,
                                              strict=True):
            regular = F.interpolate(reduce(features[level]), size=size, mode="bilinear", align_corners=False)
            shape = gate(block(shape), regular)
        return self.edge(shape)


class FusionASPP(nn.Module):
    """Atrous spatial pyramid pooling with the boundary map as one more branch."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(channels, ASPP_CHANNELS)]
            + [_conv_bn_relu(channels, ASPP_CHANNELS, 3, rate) for rate in ASPP_RATES])
        self.pooled = _conv_bn_relu(channels, ASPP_CHANNELS)
        self.edge = _conv_bn_relu(1, ASPP_CHANNELS)
        self.project = _conv_bn_relu(ASPP_CHANNELS * (len(ASPP_RATES) + 3), ASPP_CHANNELS)
        self.classifier = nn.Conv2d(ASPP_CHANNELS, classes, 1)

    def forward(self, x: torch.Tensor, edge_probability: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = self.pooled(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *size)
        edge = self.edge(F.interpolate(edge_probability, size=size, mode="bilinear", align_corners=False))
        return self.classifier(self.project(torch.cat([b(x) for b in self.branches] + [pooled, edge], dim=1)))


class GatedSCNN(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.shape_stream = ShapeStream(tuple(encoder.out_channels))
        self.aspp = FusionASPP(encoder.out_channels[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | TrainingOutput:
        features = self.encoder(x)
        edge_logits = self.shape_stream(features)
        scores = self.aspp(features[-1], torch.sigmoid(edge_logits))
        logits = F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        edge_logits = F.interpolate(edge_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return TrainingOutput(logits, lambda targets, ignore_index: dual_task_loss(
            logits, edge_logits.squeeze(1), targets, ignore_index))


def dual_task_loss(logits: torch.Tensor, edge_logits: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    """``EDGE_WEIGHT`` x class-balanced BCE of the boundary logits (N, H, W) against the label
    edges over labelled pixels, plus ``REGULARISER_WEIGHT`` x (``boundary_consistency`` of
    ``logits`` and the cross-entropy of ``logits`` on the labelled pixels the shape stream gives
    a boundary probability above ``EDGE_THRESHOLD``)."""
    logits, edge_logits = logits.float(), edge_logits.float()
    labelled = targets != ignore_index
    edges = label_edges(targets, ignore_index).float()
    positives, count = (edges * labelled).sum(), labelled.sum().clamp(min=1)
    # Few pixels are edges: each side weighs by the other's share, as the paper's (HED's) loss.
    weight = torch.where(edges.bool(), 1 - positives / count, positives / count) * labelled
    edge_loss = F.binary_cross_entropy_with_logits(edge_logits, edges, weight=weight, reduction="sum") / count
    sure = labelled & (torch.sigmoid(edge_logits.detach()) > EDGE_THRESHOLD)
    per_pixel = F.cross_entropy(logits, targets.masked_fill(~labelled, 0), reduction="none")
    regulariser = (per_pixel * sure).sum() / sure.sum().clamp(min=1)
    consistency = boundary_consistency(logits, targets, ignore_index)
    return EDGE_WEIGHT * edge_loss + REGULARISER_WEIGHT * (consistency + regulariser)
