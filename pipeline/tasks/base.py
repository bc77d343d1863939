"""The task protocol: everything that differs between segmentation tasks.

Stages, the engine, the registry gate and the evaluation ask a ``Task``; none of them
compares task names. ``prepare`` records the task in the prepared card (``card.json``,
key ``task``), training copies it into the model's meta, and later stages read it from
there (``pipeline.tasks.task_of``).

A task is stateless; its methods take what they need. Semantic segmentation
(``pipeline.tasks.semantic``) is today's; instance and panoptic segmentation implement the
same protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from pipeline.models.base import TrainingOutput
from pipeline.tasks.options import QueryOption

JSON = "application/json"     # the media type of a JSON answer (``Task.answer``)


class EvaluateError(RuntimeError):
    """A model and dataset that cannot be evaluated together."""


class Metric(Protocol):
    """Accumulates a split's scores batch by batch, on every rank."""

    def update(self, outputs: Any, targets: Any) -> None: ...

    def all_reduce(self) -> Metric: ...

    def compute(self) -> dict[str, Any]: ...


class Task(ABC):
    """One segmentation task: its targets, batches, loss contract, metrics and outputs.

    ``primary_metric``: the key of ``epoch_metrics`` (after ``val_``) and of the evaluation
    report that picks the best epoch, is the registry's score (tags ``test_score`` and
    ``score_metric``) and gates a new champion; higher is better. ``primary_label``: how
    people read it. ``labels``: the report's headline keys as people read them, primary
    first (the dashboard's score cards). ``per_class_keys``: the report's per-class scores
    (``report["per_class"][name][key]``) recorded in MLflow. ``views``: the dashboard's
    evaluation pages that this task's outputs feed (``dashboards.app``).
    """

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    primary_label: ClassVar[str]
    labels: ClassVar[dict[str, str]]
    per_class_keys: ClassVar[tuple[str, ...]] = ()
    views: ClassVar[tuple[str, ...]] = ()
    target_columns: ClassVar[tuple[str, ...]] = ("mask",)   # the prepared shards' columns of the targets
    onnx_export: ClassVar[bool] = True        # register can export its models to ONNX and check them
    tiles: ClassVar[bool] = True              # its predictor tiles large images (else refuses them)

    # --- data: prepared rows -> batches ------------------------------------------------------
    @abstractmethod
    def train_transform(self, crop: tuple[int, int], scale: tuple[float, float], jitter: float,
                        ignore_index: int) -> Any:
        """The training augmentation (applied to image and target alike)."""

    def targets_of(self, columns: Mapping[str, Sequence]) -> Sequence:
        """Rows' ``target_columns`` (column name -> values, as a batch or table gives them) -> one
        target per row as ``collate`` takes it: the column's value when there is one column, else
        a tuple of the columns' values."""
        if len(self.target_columns) == 1:
            return columns[self.target_columns[0]]
        return list(zip(*(columns[name] for name in self.target_columns), strict=True))

    @abstractmethod
    def collate(self, images: Sequence[bytes], targets: Sequence[bytes], *, mean: Sequence[float],
                std: Sequence[float], ignore_index: int, transform: Any = None) -> tuple[torch.Tensor, Any]:
        """Encoded rows -> (normalised images (N, 3, H, W), targets as the loss and metric take them)."""

    # --- training: the model's output and loss contract -------------------------------------
    def targets_to(self, targets: Any, device: torch.device) -> Any:
        """``collate``'s targets on ``device``."""
        return targets.to(device, non_blocking=True)

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: Any,
                      loss_fn: nn.Module) -> torch.Tensor:
        """One training step's scalar loss. The engine calls it under autocast when mixed
        precision is on; here the forward runs under it and the loss, in float32, outside."""
        outputs = model(images)
        own = None
        if isinstance(outputs, TrainingOutput):           # a network with a loss of its own (PointRend)
            outputs, own = outputs
        with torch.autocast(images.device.type, enabled=False):
            loss = loss_fn(outputs.float(), targets)
            return loss if own is None else loss + own(targets)

    def validation_step(self, model: nn.Module, images: torch.Tensor, targets: Any,
                        loss_fn: nn.Module | None) -> tuple[Any, torch.Tensor | None]:
        """(outputs for ``Metric.update``, the batch's mean loss or None) of a model in eval mode."""
        outputs = model(images).float()
        return outputs, None if loss_fn is None else loss_fn(outputs, targets)

    @abstractmethod
    def build_loss(self, loss_cfg: Any, num_classes: int, ignore_index: int,
                   class_weights: list[float] | None) -> nn.Module:
        """``loss_fn(outputs, targets) -> scalar tensor`` for the model's outputs."""

    @abstractmethod
    def metric(self, num_classes: int, ignore_index: int, device: torch.device,
               thing_classes: Sequence[int] = ()) -> Metric:
        """A fresh accumulator for validation; ``thing_classes``: the 0-based indices of the
        classes classes.json marks ``isthing`` (tasks that tell things from stuff use them)."""

    @abstractmethod
    def epoch_metrics(self, computed: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
        """A validation ``Metric.compute()`` as flat ``val_*`` scalars (MLflow, Ray), with
        ``val_<primary_metric>`` among them."""

    @abstractmethod
    def training_summary(self, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
        """From the best epoch's reported metrics: the train stage's DVC headline (with
        ``best_val_<primary_metric>``), and its plot files (name -> rows)."""

    # --- the evaluate stage -----------------------------------------------------------------
    @abstractmethod
    def evaluate_split(self, model: nn.Module, data: Path, cfg: Any, predictor: Any) -> Any:
        """Predict every image of ``cfg.split`` with ``predictor`` and count; nothing written.
        Raises ``EvaluateError`` when model and data do not go together."""

    @abstractmethod
    def report(self, evaluation: Any) -> dict[str, Any]:
        """The scores of ``evaluate_split``'s result, JSON-ready, with ``primary_metric`` among them."""

    def headline_keys(self) -> tuple[str, ...]:
        """The report's keys that go to the DVC metrics file and MLflow (short: one table row)."""
        return tuple(self.labels)

    @abstractmethod
    def write_outputs(self, evaluation: Any, data: Path, cfg: Any, out: Path, full: dict[str, Any]) -> None:
        """The evaluation folder (pictures, index, the whole report), written whole."""

    @abstractmethod
    def plots(self, evaluation: Any, full: dict[str, Any]) -> dict[str, list[dict]]:
        """DVC plots data: file name -> rows."""

    # --- serving ----------------------------------------------------------------------------
    answers: ClassVar[dict[str, str]]     # /predict's formats -> media type; the first is the default
    # /predict's query parameters of this task's answers beside format and alpha (name -> spec)
    query_options: ClassVar[dict[str, QueryOption]] = {}

    def predictor(self, model: nn.Module, **overrides: Any) -> Any:
        """What ``predict`` predicts with: the model's recorded inference settings, each replaced
        by an override that is not None (``Predictor.for_model``)."""
        from pipeline.inference.predictor import Predictor

        return Predictor.for_model(model, **overrides)

    @abstractmethod
    def predict(self, predictor: Any, images: list) -> list:
        """A batch of (H, W, 3) uint8 RGB images of any sizes -> one prediction each."""

    @abstractmethod
    def answer(self, options: Any, image: Any, prediction: Any, meta: Any) -> tuple[Any, str]:
        """One prediction as ``options`` ask (``pipeline.serving.api.Options``: ``format``, ``alpha``,
        ``task_options`` = this task's ``query_options`` parsed, defaults filled in):
        (bytes, media type), or (a JSON-ready dict, ``JSON``)."""
