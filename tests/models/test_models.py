import hashlib
import json
import os
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from pipeline.config import paths
from pipeline.config.params import ModelParams
from pipeline.models import weights
from pipeline.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SegmentationModel, pad_input
from pipeline.models.registry import build_model
from pipeline.models.smp import encoder_normalisation
from pipeline.models.weights import ENCODER_WEIGHT_FILES, WeightsChecksumError

MOBILENET_FILE = ENCODER_WEIGHT_FILES["mobilenet_v2"].name


def params(**kw) -> ModelParams:
    return ModelParams.defaults(**({"encoder_weights": None} | kw))


@pytest.fixture(autouse=True)
def _no_weights_dir(monkeypatch):
    # Each test sets $SEG_WEIGHTS_DIR itself. The caller's value is read first, by the
    # module-scoped `weights_dir` fixture below (wider scopes are set up first).
    monkeypatch.delenv(paths.ENV_WEIGHTS_DIR, raising=False)


@pytest.fixture(scope="module")
def weights_dir() -> Path:
    """The real pretrained-weights directory from $SEG_WEIGHTS_DIR (e.g. ../shared/weights)."""
    value = os.environ.get(paths.ENV_WEIGHTS_DIR)
    if not value or not (Path(value) / MOBILENET_FILE).is_file():
        pytest.skip(f"${paths.ENV_WEIGHTS_DIR} with {MOBILENET_FILE} not available")
    return Path(value)


@pytest.mark.parametrize(
    ("arch", "encoder", "kwargs"),
    [
        ("Unet", "mobilenet_v2", {}),
        ("FPN", "resnet18", {}),
        ("DeepLabV3Plus", "mobilenet_v2", {}),  # dilated encoder: output stride 16
        ("PAN", "mobilenet_v2", {}),            # its pyramid block needs sides of 8 * 16 pixels
        ("Segformer", "tu-resnet18", {}),
    ],
)
def test_any_input_size_gives_logits_of_that_size(arch, encoder, kwargs):
    model = build_model(params(arch=arch, encoder_name=encoder, kwargs=kwargs), num_classes=4).eval()
    assert isinstance(model, SegmentationModel)
    with torch.no_grad():
        for shape in [(2, 3, 37, 53), (1, 3, 64, 64), (1, 3, 31, 17)]:
            assert model(torch.randn(shape)).shape == (shape[0], 4, *shape[2:])


@pytest.mark.parametrize(("arch", "encoder", "kwargs", "frozen"), [
    ("PSPNet", "mobilenet_v2", {}, True),                       # encoder_depth 3 of 5 stages
    ("Unet", "mobilenet_v2", {"encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]}, True),
    ("Unet", "mobilenet_v2", {}, False),
    ("Linknet", "resnet18", {}, False),
])
def test_every_trainable_parameter_gets_a_gradient(arch, encoder, kwargs, frozen):
    """What DistributedDataParallel requires of a model trained by several workers: smp keeps an
    encoder's stages beyond ``encoder_depth``, which PSPNet's two workers crashed on."""
    model = build_model(params(arch=arch, encoder_name=encoder, kwargs=kwargs), num_classes=3).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    without = [n for n, p in trainable if p.grad is None]
    assert trainable and not without, without
    idle = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert bool(idle) == frozen and all(".encoder." in n for n in idle), idle


def test_crop_keeps_the_original_pixels_in_place():
    model = build_model(params(), num_classes=2).eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        padded = model.net(torch.nn.functional.pad(x, (0, 14, 0, 24), mode="reflect"))
        assert torch.allclose(model(x), padded[..., :40, :50])


def test_pad_input_reflects_and_falls_back_to_replicate_for_tiny_inputs():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    assert pad_input(x, 8).shape == (1, 2, 8, 8)
    y = pad_input(x, 8)
    assert torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5, :7], x[..., 3, :])   # reflect: the row above the edge, mirrored
    tiny = pad_input(x, 32)                            # pads of 27 and 25 exceed the sides
    assert tiny.shape == (1, 2, 32, 32) and torch.equal(tiny[..., 31, 31], x[..., 4, 6])
    assert pad_input(x, 8, min_size=20).shape == (1, 2, 24, 24)
    even = torch.zeros(1, 1, 16, 32)
    assert pad_input(even, 16) is even


def test_unknown_arch_names_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"model\.arch: unknown architecture 'Unett'.*Unet, UnetPlusPlus"):
        build_model(params(arch="Unett"), 2)


@pytest.mark.parametrize(
    ("name", "suggestion"), [("mobilenetv2", "mobilenet_v2"), ("tu-resnet_18", "tu-resnet18")]
)
def test_unknown_encoder_names_the_key_and_close_matches(name, suggestion):
    with pytest.raises(ValueError, match=r"model\.encoder_name: unknown .*encoder") as err:
        build_model(params(encoder_name=name), 2)
    assert suggestion in str(err.value)


def test_misspelt_or_clashing_kwargs_name_the_key():
    with pytest.raises(ValueError, match=r"model\.kwargs\.decoder_chanels: not a keyword of smp\.Unet"):
        build_model(params(kwargs={"decoder_chanels": [8, 8, 8, 8, 8]}), 2)
    with pytest.raises(ValueError, match=r"model\.kwargs\.classes: set model\.classes instead"):
        build_model(params(kwargs={"classes": 3}), 2)


def test_classes_and_metadata():
    meta = ModelMeta(class_names=["bg", "cat", "dog"], palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]])
    model = build_model(params(), num_classes=3, meta=meta)
    assert model.meta.class_names == ("bg", "cat", "dog")
    assert model.meta.mean == IMAGENET_MEAN  # filled in from the encoder
    assert json.loads(json.dumps(model.meta.to_dict()))["palette"][1] == [255, 0, 0]
    assert not any(k.startswith("meta") for k in model.state_dict())
    assert build_model(params(classes=5), num_classes=3).net.segmentation_head[0].out_channels == 5
    with pytest.raises(ValueError, match="3 class names for a model with 2 classes"):
        build_model(params(), num_classes=2, meta=meta)
    with pytest.raises(ValueError, match=r"meta\.mean has 3 values for model\.in_channels=1"):
        rgb = ModelMeta(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        build_model(params(in_channels=1), num_classes=3, meta=rgb)
    with pytest.raises(ValueError, match="palette has 2 colours for 3 class names"):
        ModelMeta(class_names=["a", "b", "c"], palette=[[0, 0, 0], [1, 1, 1]])


def test_default_metadata_carries_the_encoder_normalisation():
    model = build_model(params(in_channels=1), num_classes=2)
    assert model.meta.mean == IMAGENET_MEAN[:1] and model.meta.std == IMAGENET_STD[:1]
    assert model.meta.ignore_index == 255


def test_encoder_normalisation_never_reaches_the_hub(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setattr("segmentation_models_pytorch.encoders.hf_hub_download", no_network)
    assert encoder_normalisation("mobilenet_v2") == (IMAGENET_MEAN, IMAGENET_STD)
    assert encoder_normalisation("tu-resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    # timm's own config for a model trained with other statistics
    assert encoder_normalisation("tu-vit_tiny_patch16_224") == ((0.5,) * 3, (0.5,) * 3)


def test_local_weights_load_into_the_encoder(monkeypatch, weights_dir):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(weights_dir))
    model = build_model(params(encoder_weights="imagenet"), num_classes=3)
    state = torch.load(weights_dir / MOBILENET_FILE, map_location="cpu", weights_only=True)
    encoder = model.net.encoder.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert encoder.keys() == expected.keys()
    assert all(torch.equal(encoder[k], v) for k, v in expected.items())

    # One input channel: the RGB filters of the first conv are summed, as smp does.
    grey = build_model(params(encoder_weights="imagenet", in_channels=1), num_classes=3)
    first = grey.net.encoder.features[0][0].weight
    assert torch.allclose(first, state["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert grey(torch.randn(1, 1, 33, 33)).shape == (1, 3, 33, 33)


def test_checksum_mismatch_names_both_digests_and_builds_nothing(monkeypatch, tmp_path):
    bad = b"not the weights"
    (tmp_path / MOBILENET_FILE).write_bytes(bad)
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    built = []
    monkeypatch.setattr(smp, "create_model", lambda *a, **k: built.append(1))
    with pytest.raises(WeightsChecksumError) as err:
        build_model(params(encoder_weights="imagenet"), 2)
    msg = str(err.value)
    assert MOBILENET_FILE in msg
    assert ENCODER_WEIGHT_FILES["mobilenet_v2"].sha256 in msg
    assert hashlib.sha256(bad).hexdigest() in msg
    assert built == []


def test_missing_or_unregistered_weights_are_errors_not_random_weights(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=MOBILENET_FILE):
        build_model(params(encoder_weights="imagenet"), 2)
    with pytest.raises(ValueError, match=r"model\.encoder_name 'resnet18'.*SEG_WEIGHTS_DIR.*mobilenet_v2"):
        build_model(params(encoder_name="resnet18", encoder_weights="imagenet"), 2)
    # Random weights asked for: the directory is not consulted.
    assert isinstance(build_model(params(encoder_name="resnet18"), 2), SegmentationModel)
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="SEG_WEIGHTS_DIR"):
        build_model(params(encoder_weights="imagenet"), 2)


def test_sha256_of_matches_hashlib(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(3 << 20 | 5))
    assert weights.sha256_of(f, chunk_bytes=1 << 20) == hashlib.sha256(f.read_bytes()).hexdigest()
