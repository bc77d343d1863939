"""A second task defined in tests only (``prepare.task: tests.tasks.foreground:ForegroundTask``):
semantic masks, but models are ranked by foreground Dice, every class but the first against
the first (background). It proves the task seam: prepare -> train -> evaluate -> register run
it with no change under ``pipeline/``."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.metrics.confusion import ConfusionMatrix
from pipeline.tasks.semantic import SemanticTask

NAME = "tests.tasks.foreground:ForegroundTask"


def foreground_dice(confusion: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN) of "any class but 0" over a (C, C) confusion matrix (rows: truth)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp, fp, fn = cm[1:, 1:].sum(), cm[0, 1:].sum(), cm[1:, 0].sum()
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan")


class ForegroundMetric(ConfusionMatrix):
    def compute(self) -> dict[str, Any]:
        return super().compute() | {"fg_dice": foreground_dice(self.mat.cpu().numpy())}


class ForegroundTask(SemanticTask):
    name = NAME
    primary_metric = "fg_dice"
    primary_label = "foreground Dice"
    labels = {"fg_dice": "foreground Dice", **SemanticTask.labels}

    def metric(self, num_classes, ignore_index, device, thing_classes=()):
        return ForegroundMetric(num_classes, ignore_index, device=device)

    def epoch_metrics(self, computed, class_names):
        return super().epoch_metrics(computed, class_names) | {"val_fg_dice": computed["fg_dice"]}

    def report(self, evaluation):
        return super().report(evaluation) | {"fg_dice": foreground_dice(evaluation.confusion)}
