"""The classic architectures of issue 19 (``pipeline.models.seed``), tested as smp tests its
own: forward and backward at a size their stride allows, and the parameter counts their
papers give."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.seed.deeplab import OUTPUT_STRIDE, V1_RATES, V2_RATES, AtrousVGG16, DeepLab, SmpAtrous
from pipeline.models.seed.enet import ENet
from pipeline.models.seed.fcn import FCN, SKIPS, SmpFeatures, VGG16Features, upsampler
from pipeline.models.seed.segnet import SegNet
from pipeline.models.seed.tiramisu import VARIANTS, FCDenseNet, fc_densenet
from pipeline.models.seed.unet import LEARNED, SKIP_MERGES, UPSAMPLING, UNet
from pipeline.models.smp import encoder

# (class, parameters the paper gives, classes): the ENet paper (Paszke et al. 2016) compares
# both in its table of hardware requirements: ENet 0.37 M, SegNet 29.46 M.
PAPER_SIZES = [(ENet, 0.37e6, 19), (SegNet, 29.46e6, 11)]


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("arch", "paper", "classes"), PAPER_SIZES, ids=lambda v: getattr(v, "__name__", ""))
def test_parameter_count_is_the_papers(arch, paper, classes):
    assert parameters(arch(3, classes)) == pytest.approx(paper, rel=0.02)


# FC-DenseNet (Jegou et al. 2017, its CamVid results table): 56 -> 1.5 M, 67 -> 3.5 M,
# 103 -> 9.4 M. 67 and 103 match within 1 %; 56 counts 1.38 M here, 8 % under the paper's
# figure, with the same layout rules that give the other two (a difference it does not explain).
TIRAMISU_SIZES = [("FCDenseNet56", 1.5e6, 0.1), ("FCDenseNet67", 3.5e6, 0.02), ("FCDenseNet103", 9.4e6, 0.02)]


@pytest.mark.parametrize(("variant", "paper", "tolerance"), TIRAMISU_SIZES, ids=lambda v: str(v))
def test_fc_densenet_parameter_counts_are_the_papers(variant, paper, tolerance):
    assert parameters(fc_densenet(variant, 3, 11)) == pytest.approx(paper, rel=tolerance)


def test_an_unknown_fc_densenet_variant_is_refused_by_name():
    with pytest.raises(ValueError, match="FCDenseNet42.*allowed: " + ", ".join(VARIANTS)):
        fc_densenet("FCDenseNet42")


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)                                         # the same dropout masks
    logits = model.train()(x)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_memory_efficient_dense_blocks_train_exactly_as_the_plain_network():
    """Recomputing a dense layer in the backward pass replays its dropout mask and does not
    count the batch twice in batch norm's running statistics."""
    torch.manual_seed(0)
    plain = fc_densenet("FCDenseNet56", 3, 5, memory_efficient=False)
    efficient = fc_densenet("FCDenseNet56", 3, 5, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 96)
    out_plain, grads_plain = _train_step(plain, x)
    out_efficient, grads_efficient = _train_step(efficient, x)
    torch.testing.assert_close(out_efficient, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_efficient[name], grad, msg=name)
    for name, value in plain.state_dict().items():            # running stats, batches counted
        torch.testing.assert_close(efficient.state_dict()[name], value, msg=name)


PEAK_SCRIPT = """
import resource, sys, torch
from pipeline.models.seed.tiramisu import fc_densenet
torch.set_num_threads(1)
model = fc_densenet("FCDenseNet56", 3, 11, memory_efficient=sys.argv[1] == "1").train()
x = torch.randn(2, 3, 192, 256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(x).square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_memory_efficient_dense_blocks_take_a_fraction_of_the_plain_networks_memory():
    """The training step's peak resident memory (what Ray's memory monitor killed the CamVid
    row for) in a fresh process for each: the plain network's grows with the square of a dense
    block's depth, the recomputing one's linearly (here 0.83 GB vs 1.64 GB; FC-DenseNet56 at batch 4,
    256 x 320 takes 1.97 GB, FC-DenseNet103 2.58 GB)."""
    def peak_kib(efficient: bool) -> int:
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "1" if efficient else "0"],
                              capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    plain, efficient = peak_kib(False), peak_kib(True)
    assert efficient < 0.6 * plain, f"peak growth {efficient} KiB recomputing vs {plain} KiB plain"


# (name, builder(in_channels, classes), output stride)
PLAIN_ARCHS = [("ENet", ENet, ENet.output_stride), ("SegNet", SegNet, SegNet.output_stride),
               ("FCDenseNet56", partial(fc_densenet, "FCDenseNet56"), FCDenseNet.output_stride)]


@pytest.mark.parametrize(("name", "build", "stride"), PLAIN_ARCHS, ids=[a[0] for a in PLAIN_ARCHS])
def test_forward_and_backward_keep_the_input_size(name, build, stride):
    torch.manual_seed(0)
    model = build(in_channels=4, classes=5)
    h, w = 2 * stride, 3 * stride                                   # not square
    logits = model(torch.randn(2, 4, h, w))
    assert logits.shape == (2, 5, h, w)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", [ENet, SegNet], ids=lambda a: a.__name__)
def test_the_decoder_unpools_with_the_encoders_indices(arch):
    """Both papers' decoders place values where the encoder's max pools found them: a
    forward must call max-unpooling as often as it max-pools with indices."""
    model = arch(3, 2).eval()
    calls = {"pool": 0, "unpool": 0}
    for module in model.modules():
        if isinstance(module, nn.MaxPool2d) and module.return_indices:
            module.register_forward_hook(lambda *_: calls.__setitem__("pool", calls["pool"] + 1))
        if isinstance(module, nn.MaxUnpool2d):
            module.register_forward_hook(lambda *_: calls.__setitem__("unpool", calls["unpool"] + 1))
    with torch.no_grad():
        model(torch.randn(1, 3, arch.output_stride, arch.output_stride))
    assert calls["unpool"] == calls["pool"] > 0


@pytest.mark.parametrize("arch", list(SKIPS))
def test_fcn_on_vgg16_has_the_papers_134_m_parameters(arch):
    """The FCN paper's table of its nets: FCN-VGG16, 134 M parameters (PASCAL VOC's 21 classes)."""
    assert parameters(FCN(VGG16Features(3), 21, arch)) == pytest.approx(134e6, rel=0.01)


def test_a_learned_upsampling_starts_as_bilinear_interpolation():
    x = torch.randn(1, 3, 6, 8)
    ours = upsampler(3, 4)(x)
    theirs = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    assert ours.shape == theirs.shape == (1, 3, 24, 32)
    # The same inside; at the border the transposed convolution sees zeros beyond the image.
    assert torch.allclose(ours[..., 4:-4, 4:-4], theirs[..., 4:-4, 4:-4], atol=1e-5)


def test_fcn_skip_scores_start_at_zero_and_every_arch_keeps_the_input_size():
    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder("mobilenet_v2", in_channels=3, depth=5, weights=None)
    for arch, skips in SKIPS.items():
        model = FCN(SmpFeatures(encoder), 4, arch)
        assert len(model.skip_scores) == skips
        assert all(not layer.weight.any() and not layer.bias.any() for layer in model.skip_scores)
        logits = model(torch.randn(2, 3, 64, 96))
        assert logits.shape == (2, 4, 64, 96)
        logits.square().mean().backward()
        # The fixed last upsampling is no parameter; the score layers learn.
        assert model.score.weight.grad is not None and "final_up" not in dict(model.named_parameters())


def test_fcn_on_vgg16_runs_forward_and_backward():
    model = FCN(VGG16Features(in_channels=1), 3, "FCN8s")
    logits = model(torch.randn(1, 1, 64, 96))
    assert logits.shape == (1, 3, 64, 96)
    logits.mean().backward()
    assert model.backbone.fc[0].weight.grad is not None


def test_an_unknown_fcn_arch_is_refused_by_name():
    with pytest.raises(ValueError, match="FCN4s.*allowed: FCN32s, FCN16s, FCN8s"):
        FCN(VGG16Features(3), 2, "FCN4s")


def test_deeplab_v1_largefov_has_the_papers_20_5_m_parameters():
    """DeepLab v1's table of its fc6 choices: DeepLab-LargeFOV (3x3, rate 12), 20.5 M."""
    assert parameters(DeepLab(AtrousVGG16(3), 21, V1_RATES)) == pytest.approx(20.5e6, rel=0.01)


@pytest.mark.parametrize("backbone", [lambda: AtrousVGG16(3),
                                      lambda: SmpAtrous(encoder("mobilenet_v2", None, 3, OUTPUT_STRIDE))],
                         ids=["vgg16", "smp-mobilenet_v2"])
def test_deeplab_backbones_keep_stride_8_and_v2_pools_four_rates(backbone):
    torch.manual_seed(0)
    model = DeepLab(backbone(), 5, V2_RATES)
    x = torch.randn(1, 3, 64, 96)
    assert model.backbone(x).shape[-2:] == (8, 12)                       # output stride 8
    assert [branch[0].dilation for branch in model.branches] == [(r, r) for r in (6, 12, 18, 24)]
    logits = model(x)
    assert logits.shape == (1, 5, 64, 96)
    logits.square().mean().backward()
    assert all(branch[0].weight.grad is not None for branch in model.branches)


@pytest.fixture(scope="module")
def mobilenet_encoder():
    return smp.encoders.get_encoder("mobilenet_v2", in_channels=3, depth=5, weights=None)


@pytest.mark.parametrize("merge", SKIP_MERGES)
@pytest.mark.parametrize("method", UPSAMPLING)
def test_unet_upsamples_and_merges_every_way_the_notes_compare(mobilenet_encoder, method, merge):
    torch.manual_seed(0)
    model = UNet(mobilenet_encoder, 3, method, merge)
    logits = model(torch.randn(1, 3, 64, 96))
    assert logits.shape == (1, 3, 64, 96)
    logits.square().mean().backward()
    assert model.head.weight.grad is not None
    # The first block upsamples MobileNetV2's 1280 stride-32 maps (a learned upsampling takes
    # them to the block's width, 256) and merges the 96-map stride-16 skip: side by side, or
    # added at the skip's width.
    upsampled = 256 if method in LEARNED else 1280
    assert model.blocks[0].convs[0].in_channels == (upsampled + 96 if merge == "concat" else 96)


def test_unet_refuses_max_unpooling_over_an_smp_encoder_by_name(mobilenet_encoder):
    with pytest.raises(ValueError, match="upsampling 'max_unpool' needs the encoder's pooling indices"):
        UNet(mobilenet_encoder, 3, "max_unpool")
    with pytest.raises(ValueError, match="skip_merge 'sum': allowed: concat, add"):
        UNet(mobilenet_encoder, 3, "nearest", "sum")
    with pytest.raises(ValueError, match="upsampling 'lanczos': allowed: nearest, bed_of_nails"):
        UNet(mobilenet_encoder, 3, "lanczos")
