"""Ways a decoder makes a feature map larger, as plain functions (notebooks/02-upsampling.ipynb).

- Fixed rules: ``upsample`` with ``NEAREST``, ``BED_OF_NAILS``, ``BILINEAR`` or ``BICUBIC``.
- Max unpooling puts values back where a max pooling found them: torch's
  ``max_pool2d(..., return_indices=True)`` and ``max_unpool2d``, nothing to add here.
- Learned: transposed convolution (torch's ``conv_transpose2d``) multiplies by the
  transpose of a convolution's matrix (``conv_matrix_1d`` writes that matrix out) and can
  start from bilinear weights (``bilinear_kernel``). With a kernel size not divisible by
  the stride its windows overlap unevenly (``overlap_counts``): checkerboard artefacts,
  which resizing first and convolving after (``resize_conv``) avoids.

Feature maps are (N, C, H, W) float tensors throughout; 1-D signals are (L,) float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEAREST = "nearest"
BED_OF_NAILS = "bed_of_nails"
BILINEAR = "bilinear"
BICUBIC = "bicubic"
METHODS = (NEAREST, BED_OF_NAILS, BILINEAR, BICUBIC)


def bed_of_nails(x: Tensor, factor: int = 2) -> Tensor:
    """(N, C, H, W) -> (N, C, H * factor, W * factor): each value at the top-left of its
    factor x factor block, zeros elsewhere."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h * factor, w * factor)
    out[:, :, ::factor, ::factor] = x
    return out


def upsample(x: Tensor, method: str, factor: int = 2) -> Tensor:
    """(N, C, H, W) -> (N, C, H * factor, W * factor) by a fixed rule, one of ``METHODS``.

    Bilinear and bicubic use ``align_corners=False``: pixel centres, not corners, are
    the samples, so every output pixel is treated alike (what smp's decoders use).
    """
    if method == BED_OF_NAILS:
        return bed_of_nails(x, factor)
    if method == NEAREST:
        return F.interpolate(x, scale_factor=factor, mode=NEAREST)
    if method in (BILINEAR, BICUBIC):
        return F.interpolate(x, scale_factor=factor, mode=method, align_corners=False)
    raise ValueError(f"unknown upsampling method {method!r}; known: {', '.join(METHODS)}")


def conv_output_length(n_in: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Length of ``conv1d``'s output for an input of length ``n_in`` (no dilation)."""
    return (n_in + 2 * padding - kernel_size) // stride + 1


def conv_matrix_1d(weight: Tensor, n_in: int, stride: int = 1, padding: int = 0) -> Tensor:
    """The (n_out, n_in) matrix C with ``conv1d(x, weight, stride, padding) == C @ x``.

    weight: (k,) float, one input and one output channel. torch's convolution is a
    cross-correlation: y[i] = sum_j weight[j] * x[i * stride + j - padding], with x = 0
    outside 0..n_in-1 (zero padding), so row i holds the kernel starting at column
    i * stride - padding, cut where it leaves the input.
    """
    k = weight.shape[0]
    n_out = conv_output_length(n_in, k, stride, padding)
    if n_out < 1:
        raise ValueError(f"kernel of {k} does not fit an input of {n_in} with padding {padding}")
    matrix = weight.new_zeros(n_out, n_in)
    for i in range(n_out):
        for j in range(k):
            col = i * stride + j - padding
            if 0 <= col < n_in:
                matrix[i, col] = weight[j]
    return matrix


def bilinear_kernel(factor: int) -> Tensor:
    """(2 * factor, 2 * factor) weights with which ``conv_transpose2d(x, w, stride=factor,
    padding=factor // 2)`` upsamples by bilinear interpolation (away from the border, where
    it sees zeros): the initialisation FCN gives its learned upsampling layers.

    factor: an even integer (the padding must centre the kernel).
    """
    if factor < 2 or factor % 2:
        raise ValueError(f"bilinear_kernel needs an even factor of at least 2, got {factor}")
    k = 2 * factor
    centre = (k - 1) / 2
    ramp = 1 - (torch.arange(k, dtype=torch.float32) - centre).abs() / factor
    return ramp[:, None] * ramp[None, :]


def overlap_counts(kernel_size: int, stride: int, size: int) -> Tensor:
    """(H, W) float: how many input pixels' kernel windows land on each output pixel of a
    transposed convolution of a ``size`` x ``size`` map (no padding).

    It equals the transposed convolution of an all-ones map with an all-ones kernel, so
    a constant input comes out with this pattern: even in the interior only when
    ``kernel_size`` is divisible by ``stride`` (Odena et al., "Deconvolution and
    Checkerboard Artifacts", Distill 2016).
    """
    ones = torch.ones(1, 1, size, size)
    return F.conv_transpose2d(ones, torch.ones(1, 1, kernel_size, kernel_size), stride=stride)[0, 0]


def resize_conv(x: Tensor, weight: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour resize by ``factor``, then a stride-1 convolution that keeps the size.

    x: (N, C_in, H, W); weight: (C_out, C_in, k, k) with k odd. The border is padded by
    repeating edge pixels, so a constant input gives a constant output everywhere.
    """
    k = weight.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"resize_conv keeps the size with an odd kernel, got {k}")
    big = upsample(x, NEAREST, factor)
    return F.conv2d(F.pad(big, [k // 2] * 4, mode="replicate"), weight)
