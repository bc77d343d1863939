import pytest
import torch
import torch.nn.functional as F

from pipeline.models.upsampling import (
    BED_OF_NAILS,
    BICUBIC,
    BILINEAR,
    METHODS,
    NEAREST,
    bed_of_nails,
    bilinear_kernel,
    conv_matrix_1d,
    conv_output_length,
    overlap_counts,
    resize_conv,
    upsample,
)

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)


def test_bed_of_nails_puts_each_value_top_left_of_its_block():
    out = bed_of_nails(X, 2)
    assert out[0, 0].tolist() == [[1, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]]


def test_nearest_repeats_each_value_over_its_block():
    out = upsample(X, NEAREST, 3)
    assert torch.equal(out, X.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_scales_both_sides_and_keeps_batch_and_channels(method):
    x = torch.randn(2, 3, 5, 7)
    assert upsample(x, method, 2).shape == (2, 3, 10, 14)


@pytest.mark.parametrize("method", [NEAREST, BILINEAR, BICUBIC])
def test_interpolating_methods_keep_a_constant_map_constant(method):
    out = upsample(torch.full((1, 1, 4, 4), 0.7), method, 2)
    assert torch.allclose(out, torch.full_like(out, 0.7))


def test_bed_of_nails_keeps_the_sum_and_bilinear_x2_the_mean():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    assert torch.allclose(upsample(x, BED_OF_NAILS).sum(), x.sum())
    # Weights 1/4, 3/4 per side (edges clamped): every input pixel spreads a total of 2 x 2.
    assert torch.allclose(upsample(x, BILINEAR).mean(dim=(2, 3)), x.mean(dim=(2, 3)))


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="bed_of_nails"):
        upsample(X, "area")


# (input length, kernel size, stride, padding)
CONV_CASES = [(7, 3, 1, 0), (7, 3, 1, 1), (8, 3, 2, 1), (9, 3, 2, 1), (9, 4, 2, 1), (11, 3, 3, 0),
              (5, 5, 1, 2)]


@pytest.mark.parametrize(("n_in", "k", "stride", "padding"), CONV_CASES)
def test_conv_matrix_times_x_is_the_convolution(n_in, k, stride, padding):
    torch.manual_seed(n_in * k)
    x, w = torch.randn(n_in, dtype=torch.float64), torch.randn(k, dtype=torch.float64)
    matrix = conv_matrix_1d(w, n_in, stride, padding)
    assert matrix.shape == (conv_output_length(n_in, k, stride, padding), n_in)
    expected = F.conv1d(x.view(1, 1, -1), w.view(1, 1, -1), stride=stride, padding=padding).view(-1)
    assert torch.allclose(matrix @ x, expected)


@pytest.mark.parametrize(("n_in", "k", "stride", "padding"), CONV_CASES)
def test_transposed_convolution_is_multiplication_by_the_transposed_matrix(n_in, k, stride, padding):
    torch.manual_seed(n_in + k)
    w = torch.randn(k, dtype=torch.float64)
    matrix = conv_matrix_1d(w, n_in, stride, padding)
    y = torch.randn(matrix.shape[0], dtype=torch.float64)
    # Inputs of several lengths give this output length when stride > 1: output_padding picks n_in.
    output_padding = n_in - ((matrix.shape[0] - 1) * stride - 2 * padding + k)
    out = F.conv_transpose1d(y.view(1, 1, -1), w.view(1, 1, -1), stride=stride, padding=padding,
                             output_padding=output_padding).view(-1)
    assert torch.allclose(out, matrix.T @ y)


def test_conv_matrix_refuses_a_kernel_longer_than_the_padded_input():
    with pytest.raises(ValueError, match="does not fit"):
        conv_matrix_1d(torch.ones(5), 2, padding=1)


@pytest.mark.parametrize("factor", [2, 4])
def test_transposed_convolution_with_the_bilinear_kernel_is_bilinear_inside(factor):
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    w = bilinear_kernel(factor).to(torch.float64).view(1, 1, 2 * factor, 2 * factor)
    out = F.conv_transpose2d(x, w, stride=factor, padding=factor // 2)
    assert out.shape == (1, 1, 6 * factor, 6 * factor)
    inside = slice(factor, -factor)      # the border sees the zero padding instead of clamped edges
    assert torch.allclose(out[..., inside, inside], upsample(x, BILINEAR, factor)[..., inside, inside])


def test_bilinear_kernel_needs_an_even_factor():
    with pytest.raises(ValueError, match="even"):
        bilinear_kernel(3)


def test_kernel_3_stride_2_overlaps_unevenly_and_kernel_4_evenly_inside():
    uneven = overlap_counts(3, 2, 4)
    assert uneven.shape == (9, 9)
    assert uneven[2:7, 2:7].unique().tolist() == [1.0, 2.0, 4.0]       # the checkerboard
    assert uneven[2, 2] == 4 and uneven[2, 3] == 2 and uneven[3, 3] == 1
    even = overlap_counts(4, 2, 4)
    assert even[2:-2, 2:-2].unique().tolist() == [4.0]


def test_resize_conv_keeps_a_constant_map_constant_and_doubles_the_size():
    out = resize_conv(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), 2)
    assert out.shape == (1, 1, 8, 8)
    assert out.unique().tolist() == [9.0]


def test_resize_conv_needs_an_odd_kernel():
    with pytest.raises(ValueError, match="odd"):
        resize_conv(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2))
