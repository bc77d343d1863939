"""ONNX export of a trained model with dynamic batch, height and width.

The exported graph takes ``image``: (N, 3, H, W) float32, normalised with the model's
``meta.mean``/``meta.std``, and returns ``logits``: (N, classes, H, W), for any N and any
H, W of at least the network's stride (32 for most encoders). Like
``SegmentationModel.forward`` it pads bottom and right by reflection to a multiple of
the stride and crops back; the padding is written without data-dependent branches so
that ``torch.export`` keeps H and W symbolic (the eager model's branch on "no padding
needed" would fix them to the example's).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import SegmentationModel

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MAX_SIDE = 16384
# The exporter's graph passes log every rewrite at INFO.
for _name in ("onnx_ir", "onnxscript"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class OnnxExportError(RuntimeError):
    """A model the ONNX exporter cannot take; the message names the operation when the exporter does."""


def unsupported_operation(exc: BaseException) -> str:
    """The operation an exporter error names (``aten.remainder.Scalar``), else its first line."""
    text = "\n".join(str(e) for e in _chain(exc))
    found = re.search(r"torch\.ops\.(aten\.[\w.]+)|target=([\w.]+)", text)
    if found:
        return (found.group(1) or found.group(2)).removeprefix("torch.ops.")
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:200]


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


class _Exportable(nn.Module):
    def __init__(self, model: SegmentationModel):
        super().__init__()
        self.net = model.net
        self.multiple = model.multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        # Padded sides written as m * ceil(side / m): the exporter's shape solver then knows them
        # for multiples of m and can follow the net's halvings and doublings (with "side + (-side)
        # % m" it cannot prove that an unpooled map matches its skip, as in ENet).
        padded = F.pad(x, (0, (w + m - 1) // m * m - w, 0, (h + m - 1) // m * m - h), mode="reflect")
        out = self.net(padded)
        if isinstance(out, tuple):
            out = out[0]
        return out[..., :h, :w]


def min_side(model: SegmentationModel) -> int:
    """The smallest height or width the exported graph accepts."""
    return max(model.multiple, model.min_size)


def export_onnx(model: SegmentationModel, path: Path, opset: int = 18) -> Path:
    """Write ``model`` as ONNX to ``path`` (a temporary sibling renamed into place). A network the
    exporter cannot take raises ``OnnxExportError`` naming the operation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Exportable(model).eval()
    side = min_side(model)
    example = torch.randn(2, 3, 3 * side, 4 * side)
    dims = {0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=side, max=MAX_SIDE),
            3: torch.export.Dim("width", min=side, max=MAX_SIDE)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    try:
        try:
            torch.onnx.export(wrapper, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={"x": dims}, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        except Exception as exc:     # torch.export's and the ONNX translation's errors alike
            raise OnnxExportError(
                f"the ONNX exporter (opset {opset}) cannot take {type(model.net).__name__}: "
                f"{unsupported_operation(exc)}; set register.onnx: false to register it without "
                "an ONNX export") from exc
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the exported graph with onnxruntime on a normalised (N, 3, H, W) float32 batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]


@torch.no_grad()
def max_difference(path: Path, model: SegmentationModel, x: torch.Tensor) -> float:
    """Largest absolute logit difference between the ONNX graph and ``model`` on ``x``."""
    expected = model(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    return float(np.abs(onnx_logits(path, x.numpy()) - expected.numpy()).max())
