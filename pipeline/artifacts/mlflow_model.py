"""The trained model as an MLflow pyfunc that predicts on images of any size.

MLflow 3's default PyTorch format (torch.export, "pt2") fixes the input shape to the
example's, so the model is logged as a ``PythonModel`` around a saved model folder
(``pipeline.artifacts.model_dir``): weights, smp config, class names, palette and normalisation.

``predict`` takes one (H, W, 3) uint8 RGB array, an (N, H, W, 3) batch, or a list of
arrays of different sizes, and returns one prediction per image, as the model's task
predicts (``Task.predict``: for semantic segmentation an (H, W) uint8 class-index mask, for
instance segmentation the image's ``Instances``), with the inference settings the model
records (``meta.inference``: the flip / multi-scale TTA and tiles its registered score was
computed with), so a registered model reproduces its recorded score. Another setting:
``unwrap_python_model().predictor = task.predictor(model, flip_tta=False)``.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config import paths  # noqa: E402

MODEL_ARTIFACT = "model_dir"
PACKAGE = "segmentation-pipeline"


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipeline.artifacts.model_dir import load_model, read_config
        from pipeline.tasks import task_of_model

        folder = Path(context.artifacts[MODEL_ARTIFACT])
        self.model = load_model(folder)
        self.config = read_config(folder)
        self.task = task_of_model(self.model)
        self.predictor = self.task.predictor(self.model)

    # No type hints here: MLflow would read them as an input schema to validate against.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, np.ndarray) and model_input.ndim == 3:
            model_input = [model_input]
        return [self.task.predict(self.predictor, [np.asarray(image)])[0] for image in model_input]


def requirements() -> list[str]:
    """This package's pinned dependencies, as the environment of the logged model."""
    try:
        reqs = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r]


def log_model(model_dir: Path, name: str = "model") -> str:
    """Log ``model_dir`` to the active run as a pyfunc; returns the model URI."""
    package_dir = paths.PACKAGE_DIR
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=SegmentationPyfunc(),
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=requirements(),
    )
    return info.model_uri
