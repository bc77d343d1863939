"""FC-DenseNet, "The One Hundred Layers Tiramisu" (Jegou, Drozdzal, Vazquez, Romero and
Bengio, 2017): DenseNet's dense blocks in a U-shaped network.

A 3x3 convolution to 48 channels, then five dense blocks each followed by a transition down
(BN, ReLU, 1x1 convolution, dropout, 2x2 max pool); a bottleneck dense block; and five
transitions up (a 3x3 stride-2 transposed convolution) each followed by a dense block. A
dense block's layers (BN, ReLU, 3x3 convolution to ``growth`` channels, dropout 0.2) each
see the concatenation of the block's input and every earlier layer's output. On the way
down a block hands on its input and its new maps concatenated (and that is the skip); on
the way up only its new maps are upsampled, which keeps the width from exploding; the skip
is concatenated after each transition up. Output stride 32.

The paper's three variants (its CamVid results table): FC-DenseNet56 (4 layers a block,
growth 12, 1.5 M parameters), FC-DenseNet67 (5 layers, growth 16, 3.5 M) and FC-DenseNet103 (4, 5, 7, 10, 12
layers down, 15 in the bottleneck, mirrored up, growth 16, 9.4 M).
"""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_STRIDE = 32
FIRST_CHANNELS = 48
DROPOUT = 0.2

# name -> (layers per block on the way down, bottleneck layers, growth rate)
VARIANTS: dict[str, tuple[tuple[int, ...], int, int]] = {
    "FCDenseNet56": ((4, 4, 4, 4, 4), 4, 12),
    "FCDenseNet67": ((5, 5, 5, 5, 5), 5, 16),
    "FCDenseNet103": ((4, 5, 7, 10, 12), 15, 16),
}


def _layer(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                         nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
                         nn.Dropout2d(DROPOUT))


class DenseBlock(nn.Module):
    def __init__(self, in_channels: int, layers: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(_layer(in_channels + i * growth, growth, 3) for i in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input and every new map concatenated, the new maps alone)."""
        new = []
        for layer in self.layers:
            new.append(layer(torch.cat([x, *new], dim=1)))
        return torch.cat([x, *new], dim=1), torch.cat(new, dim=1)


class FCDenseNet(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, in_channels: int = 3, classes: int = 11, down: tuple[int, ...] = (4, 4, 4, 4, 4),
                 bottleneck: int = 4, growth: int = 12):
        super().__init__()
        self.first = nn.Conv2d(in_channels, FIRST_CHANNELS, 3, padding=1)
        channels, skips = FIRST_CHANNELS, []
        self.down_blocks, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        for layers in down:
            self.down_blocks.append(DenseBlock(channels, layers, growth))
            channels += layers * growth
            skips.append(channels)
            self.transitions_down.append(nn.Sequential(_layer(channels, channels, 1), nn.MaxPool2d(2)))
        self.bottleneck = DenseBlock(channels, bottleneck, growth)
        upsampled = bottleneck * growth                    # only the bottleneck's new maps go up
        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for layers, skip in zip(reversed(down), reversed(skips), strict=True):
            self.transitions_up.append(
                nn.ConvTranspose2d(upsampled, upsampled, 3, stride=2, padding=1, output_padding=1))
            self.up_blocks.append(DenseBlock(upsampled + skip, layers, growth))
            channels, upsampled = upsampled + skip + layers * growth, layers * growth
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.first(x), []
        for block, transition in zip(self.down_blocks, self.transitions_down, strict=True):
            x, _ = block(x)
            skips.append(x)
            x = transition(x)
        _, x = self.bottleneck(x)
        for transition, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips), strict=True):
            full, x = block(torch.cat([transition(x), skip], dim=1))
        return self.classifier(full)


def fc_densenet(variant: str, in_channels: int = 3, classes: int = 11) -> FCDenseNet:
    try:
        down, bottleneck, growth = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown FC-DenseNet variant {variant!r}; allowed: {', '.join(VARIANTS)}") from None
    return FCDenseNet(in_channels, classes, down, bottleneck, growth)
