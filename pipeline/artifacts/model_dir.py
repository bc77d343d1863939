"""Saving and loading a trained model as a self-describing folder.

    <dir>/model.pt     the SegmentationModel's state_dict
    <dir>/model.json   the model params (smp keyword arguments), number of classes,
                       meta (class names, palette, mean/std, ignore index) and any
                       extra facts (training params, metrics, data version)

``load_model`` rebuilds the network from model.json with ``encoder_weights=None``
(the weights come from model.pt), so loading needs no hub and no weights directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config.params import ModelParams
from pipeline.models.base import ModelMeta, SegmentationModel
from pipeline.models.registry import build_model
from pipeline.utils.io import read_json, write_json_atomic

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "model.json"


def save_model(
    out: Path, model: SegmentationModel, model_cfg: ModelParams, num_classes: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out`` as a whole: a staging folder beside it is renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        torch.save(model.state_dict(), staging / WEIGHTS_FILE)
        write_json_atomic(staging / CONFIG_FILE, {
            "model": model_cfg.model_dump(mode="json"),
            "num_classes": num_classes,
            "meta": model.meta.to_dict(),
            **(extra or {}),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


LEGACY_FAMILY = {"family": "smp"}


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a saved model folder (no {CONFIG_FILE})")
    return read_json(path)


def load_model(folder: Path, map_location: str | torch.device = "cpu") -> SegmentationModel:
    """The model saved in ``folder``, in eval mode, on ``map_location``."""
    config = read_config(folder)
    # Folders saved before model families existed hold smp models without a family key.
    cfg = ModelParams.model_validate(LEGACY_FAMILY | config["model"]).without_pretrained_weights()
    model = build_model(cfg, config["num_classes"], ModelMeta(**config["meta"]))
    state = torch.load(Path(folder) / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.to(map_location).eval()
