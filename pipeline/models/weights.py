"""Where a pretrained encoder's weights come from, and the check that they can be had.

With ``encoder_weights: imagenet`` and ``$SEG_WEIGHTS_DIR`` set, the encoder's ImageNet
weights come from a file in that directory named in ``ENCODER_WEIGHT_FILES`` and checked
against its sha256 (``read_encoder_weights``). With the variable unset, smp fetches them
from the Hugging Face hub (timm's ``tu-`` encoders through timm) into the local hub cache.

``ensure_encoder_weights`` makes that choice once, on the training driver before MLflow
and Ray start: a machine without network access and without the variable fails there,
once, with one line (``WeightsUnavailableError``), instead of in every Ray worker and
again on each of Ray's restarts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.config import paths

IMAGENET = "imagenet"
TIMM_PREFIX = "tu-"  # smp's prefix for an encoder taken from timm ("tu-convnext_tiny")
HUB_URL = "https://huggingface.co"


class WeightsFile(NamedTuple):
    """A pretrained encoder state dict expected in ``$SEG_WEIGHTS_DIR``."""

    name: str
    sha256: str


# encoder_name -> the file that holds its ImageNet weights. These are torchvision's
# checkpoints (torchvision names them by the first 8 hex digits of the sha256); smp's
# torchvision-based encoders load them strictly once the classifier keys are dropped.
ENCODER_WEIGHT_FILES: dict[str, WeightsFile] = {
    "mobilenet_v2": WeightsFile(
        "mobilenet_v2-b0353104.pth", "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    ),
}
_DROPPED_PREFIXES = ("classifier.",)  # the ImageNet classification head; the encoder has none


class WeightsChecksumError(RuntimeError):
    """A local weights file whose sha256 is not the one ``ENCODER_WEIGHT_FILES`` expects."""


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights a model config asks for cannot be had here: a configuration
    or environment error, reported in one line and never retried."""


def weights_file(encoder_name: str, weights_dir: Path) -> Path:
    """The verified weights file for ``encoder_name`` in ``weights_dir``.

    Raises ``ValueError`` for an encoder with no registered file (there is no silent
    fall-back to random weights), ``FileNotFoundError`` for a missing file, and
    ``WeightsChecksumError`` naming both digests when the file's sha256 differs.
    """
    entry = ENCODER_WEIGHT_FILES.get(encoder_name)
    if entry is None:
        raise ValueError(
            f"model.encoder_name {encoder_name!r}: no local ImageNet weights are registered for it, "
            f"and {paths.ENV_WEIGHTS_DIR} is set. Registered encoders: {', '.join(ENCODER_WEIGHT_FILES)}. "
            f"Use one of them, set model.encoder_weights: null, or unset {paths.ENV_WEIGHTS_DIR} "
            "to let smp download the weights."
        )
    path = weights_dir / entry.name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: weights file for encoder {encoder_name!r} not found in {paths.ENV_WEIGHTS_DIR}"
        )
    actual = sha256_of(path)
    if actual != entry.sha256:
        raise WeightsChecksumError(
            f"{path}: sha256 mismatch for encoder {encoder_name!r}: expected {entry.sha256}, got {actual}"
        )
    return path


def read_encoder_weights(encoder_name: str, weights_dir: Path) -> dict[str, torch.Tensor]:
    """The verified encoder state dict for ``encoder_name`` from ``weights_dir`` (errors as
    ``weights_file``). The digest is checked before the file is unpickled."""
    state = torch.load(weights_file(encoder_name, weights_dir), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_encoder_weights(encoder_name: str, encoder_weights: str | None) -> None:
    """Make sure the workers will find the encoder's pretrained weights, else raise
    ``WeightsUnavailableError`` with one line naming the encoder, ``$SEG_WEIGHTS_DIR`` and
    the hub.

    None: nothing to fetch. ``$SEG_WEIGHTS_DIR`` set: its file is verified (registered,
    present, sha256). Unset: the weights are resolved exactly as smp will resolve them in
    the workers (the encoder is built with them once), which fills the local hub cache, so
    that workers on this machine read them from there; offline and not cached, that fails
    here. ``encoder_name`` must be a known encoder (``build_model`` checks that).
    """
    if encoder_weights is None:
        return
    try:
        weights_dir = paths.weights_dir()
        if weights_dir is not None:
            weights_file(encoder_name, weights_dir)
            return
    except (ValueError, OSError, WeightsChecksumError) as exc:
        raise WeightsUnavailableError(_one_line(exc)) from exc
    _fetch_from_hub(encoder_name, encoder_weights)


def hub_location(encoder_name: str, encoder_weights: str) -> str:
    """Where smp (or timm, for ``tu-`` encoders) downloads the encoder's weights from."""
    import segmentation_models_pytorch as smp
    import timm

    if encoder_name.startswith(TIMM_PREFIX):
        cfg = timm.models.get_pretrained_cfg(encoder_name[len(TIMM_PREFIX):])
        if cfg is None:
            return "timm's pretrained weights"
        return f"{HUB_URL}/{cfg.hf_hub_id}" if cfg.hf_hub_id else str(cfg.url)
    settings = smp.encoders.encoders.get(encoder_name, {}).get("pretrained_settings", {}).get(encoder_weights)
    return f"{HUB_URL}/{settings['repo_id']}" if settings else "the Hugging Face hub"


def _fetch_from_hub(encoder_name: str, encoder_weights: str) -> None:
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders.get(encoder_name, {}).get("pretrained_settings")
    if settings is not None and encoder_weights not in settings:
        raise WeightsUnavailableError(
            f"model.encoder_weights: smp has no {encoder_weights!r} weights for encoder {encoder_name!r} "
            f"(only {', '.join(settings) or 'none'}); set model.encoder_weights: null or use another encoder"
        )
    # smp asks timm for a tu- encoder's default pretrained tag with weights=True.
    weights = True if encoder_name.startswith(TIMM_PREFIX) else encoder_weights
    try:
        smp.encoders.get_encoder(encoder_name, in_channels=3, depth=5, weights=weights)
    except OSError as exc:   # the hub's errors (offline mode, not found, HTTP) and URL errors are OSErrors
        local = ", ".join(ENCODER_WEIGHT_FILES)
        raise WeightsUnavailableError(
            f"encoder {encoder_name!r}: its {encoder_weights} weights cannot be had: {paths.ENV_WEIGHTS_DIR} "
            f"is not set and the hub ({hub_location(encoder_name, encoder_weights)}) did not give them "
            f"({type(exc).__name__}: {_first_sentence(exc)}). Set {paths.ENV_WEIGHTS_DIR} to a folder "
            f"of weight files (registered encoders: {local}), let this machine reach the hub, "
            "or set model.encoder_weights: null"
        ) from exc


def _first_sentence(exc: BaseException) -> str:
    return _one_line(exc).split(". ")[0].rstrip(".")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
