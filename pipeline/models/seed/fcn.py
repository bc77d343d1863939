"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer and Darrell, "Fully Convolutional Networks for
Semantic Segmentation", 2015).

A classification network made fully convolutional: on VGG-16, its fully connected fc6 and
fc7 become a 7x7 and a 1x1 convolution of 4096 channels. A 1x1 "score" convolution turns
the deepest maps (stride 32) into class scores; FCN-32s upsamples those 32 times; FCN-16s
first adds, upsampled twice, a score layer over pool4 (stride 16); FCN-8s also adds one over
pool3 (stride 8). Each 2x upsampling before a fusion is a learned transposed convolution
initialised to bilinear interpolation; the last one (32, 16 or 8 times) stays fixed
bilinear, as in the paper's reference nets. (A stride-f kernel of 2f with padding f/2, so
the output is exactly f times the input.) The score layers of the skips start at zero, so
FCN-16s and 8s start as the coarser net they refine. Output stride 32.

The backbone is VGG-16 (torchvision's layout, with the paper's fc6/fc7 convolutions) or any
smp encoder (``pipeline.models.seed.fcn.SmpFeatures``): the score layers then read its
stride-8, 16 and 32 maps, with no fc6/fc7.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models import upsampling
from pipeline.models.seed.layers import vgg16_features

OUTPUT_STRIDE = 32
SKIPS = {"FCN32s": 0, "FCN16s": 1, "FCN8s": 2}    # score layers fused below stride 32


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """(channels, channels, 2 factor, 2 factor) transposed-convolution weights that upsample
    each channel by ``factor`` bilinearly and mix none (``upsampling.bilinear_kernel`` on the
    diagonal)."""
    weight = torch.zeros(channels, channels, 2 * factor, 2 * factor)
    weight[range(channels), range(channels)] = upsampling.bilinear_kernel(factor)
    return weight


def upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learned ``factor``-times upsampling that starts as bilinear interpolation."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, factor))
    return up


class VGG16Features(nn.Module):
    """VGG-16's convolutions with fc6 and fc7 as convolutions: (pool3, pool4, fc7) maps at
    strides 8, 16 and 32, of 256, 512 and 4096 channels."""

    channels = (256, 512, 4096)

    def __init__(self, in_channels: int = 3):
        super().__init__()
        features = vgg16_features(in_channels)
        self.to_pool3, self.to_pool4, self.to_pool5 = features[:17], features[17:24], features[24:]
        self.fc = nn.Sequential(
            nn.Conv2d(512, 4096, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
            nn.Conv2d(4096, 4096, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pool3 = self.to_pool3(x)
        pool4 = self.to_pool4(pool3)
        return [pool3, pool4, self.fc(self.to_pool5(pool4))]


class SmpFeatures(nn.Module):
    """An smp encoder's stride-8, 16 and 32 maps."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.channels = tuple(encoder.out_channels[-3:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(x)[-3:])


class FCN(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, backbone: nn.Module, classes: int, arch: str = "FCN8s"):
        super().__init__()
        if arch not in SKIPS:
            raise ValueError(f"unknown FCN arch {arch!r}; allowed: {', '.join(SKIPS)}")
        self.backbone, self.skips = backbone, SKIPS[arch]
        stride8, stride16, stride32 = backbone.channels
        self.score = nn.Conv2d(stride32, classes, 1)
        # Skip score layers at zero: the finer net starts as the coarser one it refines.
        self.skip_scores = nn.ModuleList(nn.Conv2d(c, classes, 1) for c in (stride16, stride8)[:self.skips])
        for layer in self.skip_scores:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.fuse_ups = nn.ModuleList(upsampler(classes, 2) for _ in range(self.skips))
        self.factor = OUTPUT_STRIDE >> self.skips
        self.register_buffer("final_up", bilinear_kernel(classes, self.factor), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride8, stride16, stride32 = self.backbone(x)
        scores = self.score(stride32)
        for up, skip, features in zip(self.fuse_ups, self.skip_scores, (stride16, stride8), strict=False):
            scores = up(scores) + skip(features)
        return F.conv_transpose2d(scores, self.final_up, stride=self.factor, padding=self.factor // 2)
