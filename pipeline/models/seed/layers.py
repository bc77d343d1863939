"""Pieces the classic architectures share."""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 3x3 convolution (no bias: batch norm follows), batch norm and ReLU."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def vgg16_features(in_channels: int = 3) -> nn.Sequential:
    """torchvision's VGG-16 convolutions and pools (random weights: none exist offline), its
    first convolution taking ``in_channels``."""
    features = vgg16(weights=None).features
    if in_channels != 3:
        features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    return features
