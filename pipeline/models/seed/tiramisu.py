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

Memory: a naive dense block stores, for every layer, the concatenation it reads and its
normalised copy, so the activations kept for backward grow with the square of the block's
depth (FC-DenseNet56 at batch 4, 256 x 320 took about 10 GB a Ray worker).
``memory_efficient`` (the default) recomputes each layer's concatenation, batch norm and
convolution (and each transition down's) in the backward pass instead (Pleiss et al.,
"Memory-Efficient Implementation of DenseNets", 2017, here with ``torch.utils.checkpoint``):
only the layers' new maps are kept, for more compute a training step (each layer's forward
runs twice). The recomputation leaves batch norm's running statistics alone and replays
dropout's mask, so the gradients and the statistics are those of the plain network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


@contextmanager
def _running_stats_untouched(module: nn.Module) -> Iterator[None]:
    """Batch norm in ``module`` runs as in training (the same ops, so checkpoint's recomputation
    saves what the forward pass saved) and its running statistics and batch count are put back
    afterwards: a recomputation must not count the batch twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    buffers = [buffer for norm in norms for buffer in norm.buffers()]   # running mean, var, batches
    kept = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, kept, strict=True):
                buffer.copy_(value)


def _concatenated(layer: nn.Module, *features: torch.Tensor) -> torch.Tensor:
    return layer(torch.cat(features, dim=1))


def _run(layer: nn.Module, features: list[torch.Tensor], recompute: bool) -> torch.Tensor:
    """``layer`` on ``features`` concatenated; with ``recompute`` in a training step, only the
    features and the result are kept for backward (the concatenation and what ``layer`` computes
    inside are computed again there)."""
    if recompute and layer.training and torch.is_grad_enabled():
        return checkpoint(_concatenated, layer, *features, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _running_stats_untouched(layer)))
    return _concatenated(layer, *features)


class DenseBlock(nn.Module):
    def __init__(self, in_channels: int, layers: int, growth: int, memory_efficient: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(_layer(in_channels + i * growth, growth, 3) for i in range(layers))
        self.memory_efficient = memory_efficient

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the inputs and every new map concatenated, the new maps alone)."""
        new: list[torch.Tensor] = []
        for layer in self.layers:
            new.append(_run(layer, [*inputs, *new], self.memory_efficient))
        return torch.cat([*inputs, *new], dim=1), torch.cat(new, dim=1)


class FCDenseNet(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, in_channels: int = 3, classes: int = 11, down: tuple[int, ...] = (4, 4, 4, 4, 4),
                 bottleneck: int = 4, growth: int = 12, memory_efficient: bool = True):
        super().__init__()
        self.memory_efficient = memory_efficient
        self.first = nn.Conv2d(in_channels, FIRST_CHANNELS, 3, padding=1)
        channels, skips = FIRST_CHANNELS, []
        self.down_blocks, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        for layers in down:
            self.down_blocks.append(DenseBlock(channels, layers, growth, memory_efficient))
            channels += layers * growth
            skips.append(channels)
            self.transitions_down.append(nn.Sequential(_layer(channels, channels, 1), nn.MaxPool2d(2)))
        self.bottleneck = DenseBlock(channels, bottleneck, growth, memory_efficient)
        upsampled = bottleneck * growth                    # only the bottleneck's new maps go up
        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for layers, skip in zip(reversed(down), reversed(skips), strict=True):
            self.transitions_up.append(
                nn.ConvTranspose2d(upsampled, upsampled, 3, stride=2, padding=1, output_padding=1))
            self.up_blocks.append(DenseBlock(upsampled + skip, layers, growth, memory_efficient))
            channels, upsampled = upsampled + skip + layers * growth, layers * growth
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.first(x), []
        for block, transition in zip(self.down_blocks, self.transitions_down, strict=True):
            x, _ = block(x)
            skips.append(x)
            x = _run(transition, [x], self.memory_efficient)
        _, x = self.bottleneck(x)
        for transition, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips), strict=True):
            full, x = block(transition(x), skip)
        return self.classifier(full)


def fc_densenet(variant: str, in_channels: int = 3, classes: int = 11,
                memory_efficient: bool = True) -> FCDenseNet:
    try:
        down, bottleneck, growth = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown FC-DenseNet variant {variant!r}; allowed: {', '.join(VARIANTS)}") from None
    return FCDenseNet(in_channels, classes, down, bottleneck, growth, memory_efficient)
