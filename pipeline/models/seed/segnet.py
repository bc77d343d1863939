"""SegNet (Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", 2017).

The encoder is VGG-16's 13 convolutions (with batch normalisation) in five blocks, each
ending in a 2x2 max pool that keeps its indices; the decoder mirrors it, and each of its
blocks starts by max-unpooling with the indices of the matching encoder pool (the sparse
map that the paper's "pooling indices" transfer), then densifies it with convolutions. No
features are copied across, only indices: about 29.4 M parameters, against U-Net's
concatenated feature maps. Output stride 32, so sides must be multiples of 32.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.seed.layers import conv_bn_relu

OUTPUT_STRIDE = 32
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))    # (channels, convolutions) per block



def _encoder_block(in_channels: int, channels: int, convs: int) -> nn.Sequential:
    layers = conv_bn_relu(in_channels, channels)
    for _ in range(convs - 1):
        layers += conv_bn_relu(channels, channels)
    return nn.Sequential(*layers)


def _decoder_block(channels: int, convs: int, out_channels: int) -> nn.Sequential:
    """``convs`` convolutions at ``channels``, the last one to ``out_channels`` (the next
    decoder block's width), as the encoder block it mirrors, read backwards."""
    layers: list[nn.Module] = []
    for _ in range(convs - 1):
        layers += conv_bn_relu(channels, channels)
    return nn.Sequential(*layers, *conv_bn_relu(channels, out_channels))


class SegNet(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, in_channels: int = 3, classes: int = 11):
        super().__init__()
        widths = [in_channels] + [c for c, _ in VGG16_BLOCKS]
        self.encoder = nn.ModuleList(
            _encoder_block(widths[i], c, n) for i, (c, n) in enumerate(VGG16_BLOCKS))
        # Decoder block i mirrors encoder block i and hands over to block i - 1's width; the
        # first encoder block's mirror keeps 64 channels for the classifier.
        outs = [VGG16_BLOCKS[0][0]] + [c for c, _ in VGG16_BLOCKS[:-1]]
        self.decoder = nn.ModuleList(
            _decoder_block(c, n, outs[i]) for i, (c, n) in enumerate(VGG16_BLOCKS))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.classifier = nn.Conv2d(VGG16_BLOCKS[0][0], classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = []
        for block in self.encoder:
            x, index = self.pool(block(x))
            indices.append(index)
        for block, index in zip(reversed(self.decoder), reversed(indices), strict=True):
            x = block(self.unpool(x, index))
        return self.classifier(x)
