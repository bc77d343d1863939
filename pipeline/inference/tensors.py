"""Prediction on whole images of any size, shared by evaluation, MLflow and serving."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.base import SegmentationModel


def to_tensor(images: list[np.ndarray], mean, std) -> torch.Tensor:
    """Same-size (H, W, 3) uint8 images -> (N, 3, H, W) float32, normalised."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def forward_images(model: SegmentationModel, images: list[np.ndarray]):
    """The model's output for same-size (H, W, 3) uint8 RGB images, normalised as its meta
    says, on the model's device."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return model(to_tensor(images, model.meta.mean, model.meta.std).to(device))


@torch.no_grad()
def predict_logits(model: SegmentationModel, image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (C, H, W) float32 logits on the CPU."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    device = next(model.parameters()).device
    x = to_tensor([image], model.meta.mean, model.meta.std).to(device)
    return model(x)[0].float().cpu()


def predict_mask(model: SegmentationModel, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 class indices."""
    return predict_logits(model, image).argmax(0).to(torch.uint8).numpy()
