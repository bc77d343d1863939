"""DeepLab v1 and v2 (Chen, Papandreou, Kokkinos, Murphy and Yuille, 2015 and 2017): an
atrous (dilated) backbone at output stride 8, class scores upsampled bilinearly 8 times.

- **v1, LargeFOV**: VGG-16 whose pool4 and pool5 keep the resolution (3x3, stride 1), conv5
  dilated by 2, then fc6 as a 3x3 convolution of 1024 channels dilated by 12 (a large field
  of view at a fifth of fc6's weights), fc7 (1x1, 1024) and the class scores: about 20.5 M
  parameters.
- **v2, ASPP**: atrous spatial pyramid pooling, four such fc6-fc7-score branches at rates 6,
  12, 18 and 24 over the same maps, their scores summed (the paper's ASPP-L).

Their dense-CRF post-processing comes with issue 20. The backbone is that VGG-16, any smp
encoder built at output stride 8 (``smp.encoders.get_encoder(..., output_stride=8)``, which
dilates its last stages; ``SmpAtrous`` takes its deepest map), or an undilated smp encoder under FastFCN's
joint pyramid upsampling (``JPU``), which gives stride-8 features without dilation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.seed.layers import vgg16_features

OUTPUT_STRIDE = 8
V1_RATES = (12,)                 # LargeFOV
V2_RATES = (6, 12, 18, 24)       # ASPP-L
HEAD_CHANNELS = 1024
JPU_WIDTH = 128
JPU_DILATIONS = (1, 2, 4, 8)


class AtrousVGG16(nn.Module):
    """VGG-16's convolutions at output stride 8: pool4 and pool5 3x3 with stride 1, conv5
    dilated by 2. 512 channels out."""

    out_channels = 512

    def __init__(self, in_channels: int = 3):
        super().__init__()
        features = vgg16_features(in_channels)
        layers = list(features)
        for index in (23, 30):                                  # pool4, pool5
            layers[index] = nn.MaxPool2d(3, stride=1, padding=1)
        for index in (24, 26, 28):                              # conv5_1..3
            conv = layers[index]
            conv.dilation, conv.padding = (2, 2), (2, 2)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class SmpAtrous(nn.Module):
    """An smp encoder built at output stride 8: its deepest maps."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_channels = encoder.out_channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]


class JPU(nn.Module):
    """FastFCN's joint pyramid upsampling (Wu, Zhang, Huang, Liang and Yu, "FastFCN: Rethinking
    Dilated Convolution in the Backbone for Semantic Segmentation", 2019), in place of dilation:
    an undilated smp encoder's stride-8, 16 and 32 maps, each to ``JPU_WIDTH`` channels (3x3
    convolution, batch norm, ReLU), upsampled to stride 8 and concatenated; then four separable
    3x3 convolutions dilated 1, 2, 4 and 8 side by side, concatenated: stride-8 features of
    4 x ``JPU_WIDTH`` channels, as a dilated backbone would give, from a backbone that computed
    its deep stages at 1/16 and 1/32 of the cost. ``JPU_WIDTH`` is 128 (the paper's 512 sits on
    ResNet-101): 512 channels out, as VGG-16's, so the DeepLab head keeps its size."""

    input_multiple = 32                  # the encoder itself downsamples 32 times

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, JPU_WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(JPU_WIDTH),
                          nn.ReLU(inplace=True))
            for c in encoder.out_channels[-3:])
        joint = 3 * JPU_WIDTH
        self.dilated = nn.ModuleList(
            nn.Sequential(nn.Conv2d(joint, joint, 3, padding=d, dilation=d, groups=joint, bias=False),
                          nn.BatchNorm2d(joint), nn.Conv2d(joint, JPU_WIDTH, 1, bias=False),
                          nn.BatchNorm2d(JPU_WIDTH), nn.ReLU(inplace=True))
            for d in JPU_DILATIONS)
        self.out_channels = JPU_WIDTH * len(JPU_DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [reduce(f) for reduce, f in zip(self.reduce, self.encoder(x)[-3:], strict=True)]
        size = maps[0].shape[-2:]
        joint = torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                       for m in maps[1:]], dim=1)
        return torch.cat([branch(joint) for branch in self.dilated], dim=1)


def _branch(in_channels: int, classes: int, rate: int) -> nn.Sequential:
    """fc6 (3x3 dilated by ``rate``), fc7 (1x1) and the class scores."""
    return nn.Sequential(
        nn.Conv2d(in_channels, HEAD_CHANNELS, 3, padding=rate, dilation=rate), nn.ReLU(inplace=True),
        nn.Dropout2d(0.5),
        nn.Conv2d(HEAD_CHANNELS, HEAD_CHANNELS, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.5),
        nn.Conv2d(HEAD_CHANNELS, classes, 1),
    )


class DeepLab(nn.Module):
    """``rates`` (12,): v1 LargeFOV; (6, 12, 18, 24): v2 ASPP."""

    output_stride = OUTPUT_STRIDE

    def __init__(self, backbone: nn.Module, classes: int, rates: tuple[int, ...] = V1_RATES):
        super().__init__()
        self.backbone = backbone
        self.branches = nn.ModuleList(_branch(backbone.out_channels, classes, rate) for rate in rates)
        # The input side must be a multiple of this: 8, or 32 for an undilated encoder under JPU.
        self.output_stride = getattr(backbone, "input_multiple", OUTPUT_STRIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        scores = sum(branch(features) for branch in self.branches)
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)
