"""The torchvision family (Mask R-CNN): what it builds, what it refuses, where its weights come from."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from pipeline.config import paths
from pipeline.config.model_params import ModelParams
from pipeline.config.section import ParamsError
from pipeline.models.registry import build_model, ensure_weights
from pipeline.models.weights import WeightsUnavailableError

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
SHARED_WEIGHTS = Path(os.environ.get(paths.ENV_WEIGHTS_DIR, "/nonexistent"))

BASE = dict(family="torchvision", arch="maskrcnn_mobilenet_v2_fpn", encoder_weights=None, in_channels=3,
            classes=None, image_scale=1.0, trainable_layers=3, kwargs={})


def cfg(**kw):
    return ModelParams.model_validate(BASE | kw)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the family must never download."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torchvision family tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_resnet50_variants_build_from_scratch_without_the_network(no_network):
    for arch in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"):
        model = build_model(cfg(arch=arch, trainable_layers=5), 2)
        assert model.net.roi_heads.box_predictor.cls_score.out_features == 3      # 2 classes + background


def test_imagenet_weights_exist_for_the_mobilenet_backbone_only():
    with pytest.raises(ValueError, match="no verified ImageNet weights"):
        cfg(arch="maskrcnn_resnet50_fpn", encoder_weights="imagenet")
    with pytest.raises(ValueError, match="trainable_layers"):
        cfg(arch="maskrcnn_resnet50_fpn", trainable_layers=6)


def test_kwargs_are_checked_against_maskrcnn():
    with pytest.raises(ValueError, match="'box_detections_per_image'.*accepted: .*box_detections_per_img"):
        build_model(cfg(kwargs={"box_detections_per_image": 300}), 1)
    with pytest.raises(ValueError, match="min_size set by the torchvision family"):
        build_model(cfg(kwargs={"min_size": 800}), 1)
    model = build_model(cfg(kwargs={"box_detections_per_img": 7}), 1)
    assert model.net.roi_heads.detections_per_img == 7


def test_imagenet_weights_need_the_weights_folder(monkeypatch, tmp_path, no_network):
    monkeypatch.delenv(paths.ENV_WEIGHTS_DIR, raising=False)
    with pytest.raises(WeightsUnavailableError, match=paths.ENV_WEIGHTS_DIR):
        ensure_weights(cfg(encoder_weights="imagenet"))
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        ensure_weights(cfg(encoder_weights="imagenet"))
    ensure_weights(cfg())                                    # nothing to fetch


@pytest.mark.skipif(not (SHARED_WEIGHTS / MOBILENET_FILE).is_file(),
                    reason=f"${paths.ENV_WEIGHTS_DIR} with {MOBILENET_FILE} not available")
def test_the_mobilenet_backbone_loads_the_verified_imagenet_file(monkeypatch, no_network):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(SHARED_WEIGHTS))
    ensure_weights(cfg(encoder_weights="imagenet"))
    model = build_model(cfg(encoder_weights="imagenet"), 1)
    state = torch.load(SHARED_WEIGHTS / MOBILENET_FILE, weights_only=True)
    first = model.net.backbone.body["0"][0].weight
    assert torch.equal(first, state["features.0.0.weight"])


def test_one_image_scale_for_crops_and_whole_images():
    """image_scale resizes inside the model; boxes and masks come back in the input's pixels."""
    torch.manual_seed(0)
    model = build_model(cfg(image_scale=2.0, kwargs={"box_score_thresh": 0.0}), 1).eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 48, 64))
    assert out["masks"].shape[-2:] == (48, 64)
    assert len(out["boxes"])
    assert float(out["boxes"][:, 2].max()) <= 64 and float(out["boxes"][:, 3].max()) <= 48
    assert model.net.transform.scale == 2.0
    assert int(out["labels"].min()) >= 0                    # 0-based: torchvision's background stays inside


def test_params_refuse_unknown_keys_of_another_family():
    with pytest.raises((ValueError, ParamsError)):
        ModelParams.model_validate(BASE | {"encoder_name": "mobilenet_v2"})
