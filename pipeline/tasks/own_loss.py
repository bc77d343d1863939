"""The part the instance and panoptic tasks share: their models (Mask R-CNN, Panoptic FPN)
take the targets and return their own losses, their targets are one dict per image, and
their evaluate stage and answers are the functions of two modules.

A subclass names ``evaluation`` (a module with ``evaluate_split``, ``report``,
``write_outputs`` and ``plots``), ``answering`` (a module with ``answer``; the subclass's
``answers`` and ``query_options`` are its ``ANSWERS`` and ``QUERY_OPTIONS``) and
``predictor_class`` (its predictor, with ``for_model``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import torch

from pipeline.tasks.base import Task


def nan_for_none(value: float | None) -> float:
    """A score for MLflow and Ray: NaN where there was nothing to score (None)."""
    return float("nan") if value is None else float(value)


class OwnLossTask(Task):
    evaluation: ClassVar[ModuleType]
    answering: ClassVar[ModuleType]
    predictor_class: ClassVar[type]
    onnx_export = False       # Mask R-CNN's heads: no checked ONNX export here (register.onnx: false)

    def targets_to(self, targets, device):
        return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                for t in targets]

    def training_loss(self, model, images, targets, loss_fn):
        losses = model(images, targets)
        if getattr(loss_fn, "needs_box_samples", False):       # IoU-balanced classification
            from pipeline.models.iou_balanced import BOX_SAMPLES, take_box_samples

            losses = losses | {BOX_SAMPLES: take_box_samples(model)}
        return loss_fn(losses)

    # --- the evaluate stage: ``evaluation``'s functions ---------------------------------------
    def evaluate_split(self, model, data, cfg, predictor) -> Any:
        return self.evaluation.evaluate_split(model, data, cfg, predictor)

    def report(self, evaluation) -> dict[str, Any]:
        return self.evaluation.report(evaluation)

    def write_outputs(self, evaluation, data, cfg, out, full) -> None:
        self.evaluation.write_outputs(evaluation, data, cfg, out, full)

    def plots(self, evaluation, full) -> dict[str, list[dict]]:
        return self.evaluation.plots(evaluation, full)

    # --- serving: ``predictor_class`` and ``answering`` ---------------------------------------
    def predictor(self, model, **overrides):
        return self.predictor_class.for_model(model, **overrides)

    def answer(self, options, image, prediction, meta):
        return self.answering.answer(options, image, prediction, meta)
