"""Where an encoder's pretrained weights come from, checked before training starts (issue 15,
item 13). The offline hub case runs in a subprocess: tests/test_train_preflight.py."""

import os
from pathlib import Path

import pytest

from pipeline.config import paths
from pipeline.models.weights import ENCODER_WEIGHT_FILES, WeightsUnavailableError, ensure_encoder_weights

MOBILENET_FILE = ENCODER_WEIGHT_FILES["mobilenet_v2"].name
SHARED = os.environ.get(paths.ENV_WEIGHTS_DIR)


def test_no_pretrained_weights_needs_nothing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(paths.ENV_WEIGHTS_DIR, raising=False)
    ensure_encoder_weights("resnet18", None)


def test_a_weights_dir_without_the_file_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    missing = f"{MOBILENET_FILE}.*not found in {paths.ENV_WEIGHTS_DIR}"
    with pytest.raises(WeightsUnavailableError, match=missing):
        ensure_encoder_weights("mobilenet_v2", "imagenet")
    with pytest.raises(WeightsUnavailableError, match="'resnet18': no local ImageNet weights are registered"):
        ensure_encoder_weights("resnet18", "imagenet")


def test_a_weights_dir_that_does_not_exist_is_an_error_not_a_download(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path / "nope"))
    with pytest.raises(WeightsUnavailableError, match=f"{paths.ENV_WEIGHTS_DIR}=.*is not a directory"):
        ensure_encoder_weights("mobilenet_v2", "imagenet")


def test_a_corrupt_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / MOBILENET_FILE).write_bytes(b"not the weights")
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="sha256 mismatch"):
        ensure_encoder_weights("mobilenet_v2", "imagenet")


@pytest.mark.skipif(not SHARED or not (Path(SHARED) / MOBILENET_FILE).is_file(),
                    reason=f"${paths.ENV_WEIGHTS_DIR} with {MOBILENET_FILE} not available")
def test_the_shared_weights_file_is_accepted(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ensure_encoder_weights("mobilenet_v2", "imagenet")
