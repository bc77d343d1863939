"""ENet (Paszke, Chaurasia, Kim and Culurciello, "ENet: A Deep Neural Network Architecture
for Real-Time Semantic Segmentation", 2016), as its Table 1 lays it out.

An initial block (a strided 3x3 convolution beside a max pool, concatenated), then residual
bottlenecks: stage 1 downsamples to 64 channels, stages 2 and 3 (128 channels) alternate
regular, dilated (2, 4, 8, 16) and asymmetric (5x1 then 1x5) convolutions, and a small
decoder (stages 4 and 5) upsamples with max-unpooling from the encoder's pooling indices.
A bottleneck projects to a quarter of its output channels, convolves there and expands
back; its extension branch ends in spatial dropout and is added to the main branch. About
0.37 M parameters (the paper's figure). Output stride 8 before the last transposed
convolution, so sides must be multiples of 8.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

OUTPUT_STRIDE = 8


def _bn_prelu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.PReLU(channels)]


class InitialBlock(nn.Module):
    """3x3 stride-2 convolution to ``out - in`` channels beside a 2x2 max pool of the input."""

    def __init__(self, in_channels: int, out_channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.post = nn.Sequential(*_bn_prelu(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.cat([self.conv(x), self.pool(x)], dim=1))


class Bottleneck(nn.Module):
    """A residual bottleneck with a regular, dilated or asymmetric middle convolution; the
    same number of channels in and out."""

    def __init__(self, channels: int, dilation: int = 1, asymmetric: bool = False, dropout: float = 0.1):
        super().__init__()
        inner = channels // 4
        if asymmetric:
            middle = [nn.Conv2d(inner, inner, (5, 1), padding=(2, 0), bias=False),
                      nn.Conv2d(inner, inner, (1, 5), padding=(0, 2), bias=False)]
        else:
            middle = [nn.Conv2d(inner, inner, 3, padding=dilation, dilation=dilation, bias=False)]
        self.branch = nn.Sequential(
            nn.Conv2d(channels, inner, 1, bias=False), *_bn_prelu(inner),
            *middle, *_bn_prelu(inner),
            nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels),
            nn.Dropout2d(dropout),
        )
        self.out = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.branch(x))


class DownBottleneck(nn.Module):
    """Halves the resolution: the main branch max-pools (keeping the indices for the
    decoder's unpooling) and pads channels with zeros; the extension branch starts with a
    2x2 stride-2 projection."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        inner = out_channels // 4
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, inner, 2, stride=2, bias=False), *_bn_prelu(inner),
            nn.Conv2d(inner, inner, 3, padding=1, bias=False), *_bn_prelu(inner),
            nn.Conv2d(inner, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.Dropout2d(dropout),
        )
        self.extra = out_channels - in_channels
        self.out = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        main, indices = self.pool(x)
        main = F.pad(main, (0, 0, 0, 0, 0, self.extra))      # zero channels after the pooled ones
        return self.out(main + self.branch(x)), indices


class UpBottleneck(nn.Module):
    """Doubles the resolution: the main branch maps channels with a 1x1 convolution and
    max-unpools with the matching encoder pool's indices; the extension branch's middle
    convolution is a 3x3 stride-2 transposed one."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        inner = in_channels // 4
        self.main = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels))
        self.unpool = nn.MaxUnpool2d(2)
        self.project = nn.Sequential(nn.Conv2d(in_channels, inner, 1, bias=False), *_bn_prelu(inner))
        self.up = nn.ConvTranspose2d(inner, inner, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.expand = nn.Sequential(*_bn_prelu(inner), nn.Conv2d(inner, out_channels, 1, bias=False),
                                    nn.BatchNorm2d(out_channels), nn.Dropout2d(dropout))
        self.out = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        main = self.unpool(self.main(x), indices)
        return self.out(main + self.expand(self.up(self.project(x))))


def _stage_2_or_3() -> list[nn.Module]:
    """Bottlenecks x.1-x.8 of stages 2 and 3 (Table 1)."""
    return [Bottleneck(128), Bottleneck(128, dilation=2), Bottleneck(128, asymmetric=True),
            Bottleneck(128, dilation=4), Bottleneck(128), Bottleneck(128, dilation=8),
            Bottleneck(128, asymmetric=True), Bottleneck(128, dilation=16)]


class ENet(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, in_channels: int = 3, classes: int = 19):
        super().__init__()
        self.initial = InitialBlock(in_channels, 16)
        self.down1 = DownBottleneck(16, 64, dropout=0.01)
        self.stage1 = nn.Sequential(*[Bottleneck(64, dropout=0.01) for _ in range(4)])
        self.down2 = DownBottleneck(64, 128, dropout=0.1)
        self.stage2 = nn.Sequential(*_stage_2_or_3())
        self.stage3 = nn.Sequential(*_stage_2_or_3())
        self.up4 = UpBottleneck(128, 64, dropout=0.1)
        self.stage4 = nn.Sequential(Bottleneck(64), Bottleneck(64))
        self.up5 = UpBottleneck(64, 16, dropout=0.1)
        self.stage5 = Bottleneck(16)
        self.classifier = nn.ConvTranspose2d(16, classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial(x)
        x, indices1 = self.down1(x)
        x, indices2 = self.down2(self.stage1(x))
        x = self.stage3(self.stage2(x))
        x = self.stage4(self.up4(x, indices2))
        x = self.stage5(self.up5(x, indices1))
        return self.classifier(x)
