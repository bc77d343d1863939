"""A U-Net decoder over any smp encoder with the choices the lecture notes compare: how a
decoder block makes its input larger (``upsampling``) and how it merges the encoder's skip
(``skip_merge``: U-Net's concatenation or LinkNet's addition).

Upsampling, each by 2 (``pipeline.models.upsampling`` shows them one by one):
``nearest``, ``bed_of_nails``, ``bilinear`` and ``bicubic`` are fixed rules and keep the
channels; the learned ones also go to the block's output width (else the first block's
learned upsampling alone, over a 1280-channel encoder, would hold tens of millions of
weights): ``transposed`` a transposed convolution (kernel 4, stride 2), ``resize_conv``
nearest then a 3x3 convolution (no checkerboard), ``pixel_shuffle`` a 3x3 convolution to 4x
the width rearranged into 2x the size (sub-pixel convolution).
``max_unpool`` needs the encoder's pooling indices, which smp encoders do not return: it
is refused by name (SegNet and ENet keep their indices).

Decoder widths as smp's Unet (256, 128, 64, 32, 16); each block upsamples, merges the skip
of the same stride (none at full size), then two 3x3 convolutions with batch norm and ReLU.
Output stride 32.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import upsampling
from pipeline.models.seed.layers import conv_bn_relu

OUTPUT_STRIDE = 32
LEARNED = ("transposed", "resize_conv", "pixel_shuffle")
UPSAMPLING = (*upsampling.METHODS, *LEARNED)
REFUSED = {"max_unpool": "needs the encoder's pooling indices, which smp encoders do not return "
                         "(SegNet and ENet keep theirs)"}
SKIP_MERGES = ("concat", "add")
DEFAULT_UPSAMPLING, DEFAULT_SKIP_MERGE = "bilinear", "concat"
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def check_choices(upsampling_method: str, skip_merge: str) -> None:
    """A ValueError naming the choice that cannot work, and why."""
    if upsampling_method in REFUSED:
        raise ValueError(f"upsampling {upsampling_method!r} {REFUSED[upsampling_method]}")
    if upsampling_method not in UPSAMPLING:
        raise ValueError(f"upsampling {upsampling_method!r}: allowed: {', '.join(UPSAMPLING)}")
    if skip_merge not in SKIP_MERGES:
        raise ValueError(f"skip_merge {skip_merge!r}: allowed: {', '.join(SKIP_MERGES)}")


class Upsample(nn.Module):
    """(N, C, H, W) -> (N, ``self.channels``, 2H, 2W) by ``method``: C for a fixed rule,
    ``out_channels`` for a learned one."""

    def __init__(self, in_channels: int, out_channels: int, method: str):
        super().__init__()
        self.method, self.channels = method, out_channels
        if method == "transposed":
            self.layer = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)
        elif method == "resize_conv":
            self.layer = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        elif method == "pixel_shuffle":
            self.layer = nn.Sequential(nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1),
                                       nn.PixelShuffle(2))
        else:
            self.channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method in upsampling.METHODS:                  # the fixed rules
            return upsampling.upsample(x, self.method)
        if self.method == "resize_conv":
            return self.layer(upsampling.upsample(x, upsampling.NEAREST))
        return self.layer(x)



class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, method: str, merge: str):
        super().__init__()
        self.up, self.merge = Upsample(in_channels, out_channels, method), merge
        up = self.up.channels
        # Addition needs the skip's width: a 1x1 convolution maps the upsampled maps to it.
        self.match = (nn.Conv2d(up, skip_channels, 1)
                      if merge == "add" and skip_channels and skip_channels != up else nn.Identity())
        merged = up + skip_channels if merge == "concat" else (skip_channels or up)
        self.convs = nn.Sequential(*conv_bn_relu(merged, out_channels),
                                   *conv_bn_relu(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1) if self.merge == "concat" else self.match(x) + skip
        return self.convs(x)


class UNet(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, encoder: nn.Module, classes: int, upsampling_method: str = DEFAULT_UPSAMPLING,
                 skip_merge: str = DEFAULT_SKIP_MERGE):
        super().__init__()
        check_choices(upsampling_method, skip_merge)
        self.encoder = encoder
        # smp encoders return the input and the maps at strides 2..32; the input is no skip.
        skips = list(reversed(encoder.out_channels[1:-1])) + [0]
        widths = [encoder.out_channels[-1], *DECODER_CHANNELS]
        self.blocks = nn.ModuleList(
            DecoderBlock(widths[i], skips[i], widths[i + 1], upsampling_method, skip_merge)
            for i in range(len(DECODER_CHANNELS)))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)[1:]
        x, skips = features[-1], list(reversed(features[:-1])) + [None]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip)
        return self.head(x)
