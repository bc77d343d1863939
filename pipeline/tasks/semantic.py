"""Semantic segmentation: one class index per pixel.

Targets are (H, W) uint8 PNG masks of class indices (``ignore_index`` for pixels without
a class); the model returns logits (N, C, H, W); the loss is a weighted sum of the terms of
``pipeline.losses.terms``; the metric is one confusion matrix over the split, and mIoU its
primary score. The evaluate stage's scores and pictures: ``pipeline.tasks.semantic_eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data import augment
from pipeline.losses import terms
from pipeline.metrics.confusion import ConfusionMatrix
from pipeline.tasks import semantic_answers, semantic_eval
from pipeline.tasks.base import Task

VAL_IOU_PLOT = "val_iou.json"


class SemanticTask(Task):
    name = "semantic"
    primary_metric = "miou"
    primary_label = "mIoU"
    labels = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy", "mean_dice": "mean Dice",
              "fw_iou": "frequency-weighted IoU", "boundary_miou": "boundary mIoU"}
    per_class_keys = ("iou", "dice", "boundary_iou", "hd95", "asd")
    views = ("per_class", "confusion", "overlays")

    def train_transform(self, crop, scale, jitter, ignore_index):
        return augment.train_transform(crop, scale, jitter, ignore_index)

    def collate(self, images, targets, *, mean, std, ignore_index, transform=None):
        return augment.collate(images, targets, mean=mean, std=std, ignore_index=ignore_index,
                               transform=transform)

    def build_loss(self, loss_cfg, num_classes, ignore_index, class_weights) -> nn.Module:
        return terms.build_loss(loss_cfg, num_classes, ignore_index, class_weights)

    def metric(self, num_classes: int, ignore_index: int, device: torch.device,
               thing_classes: Sequence[int] = ()) -> ConfusionMatrix:
        return ConfusionMatrix(num_classes, ignore_index, device=device)

    def epoch_metrics(self, computed: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
        out = {"val_miou": computed["miou"], "val_pixel_accuracy": computed["pixel_accuracy"],
               "val_mean_dice": computed["mean_dice"], "val_fwiou": computed["fw_iou"]}
        for name, iou in zip(class_names, computed["iou"], strict=True):
            out[f"val_iou_{name}"] = iou
        return out

    def training_summary(self, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
        headline = {
            f"best_val_{self.primary_metric}": best[f"val_{self.primary_metric}"],
            "best_epoch": int(best["epoch"]) + 1,
            "val_pixel_accuracy": best["val_pixel_accuracy"], "val_mean_dice": best["val_mean_dice"],
        }
        val_iou = [{"class": k.removeprefix("val_iou_"), "iou": v}
                   for k, v in best.items() if k.startswith("val_iou_")]
        return headline, {VAL_IOU_PLOT: val_iou}

    def evaluate_split(self, model, data: Path, cfg, predictor) -> semantic_eval.Evaluation:
        return semantic_eval.evaluate_split(model, data, cfg, predictor)

    def report(self, evaluation: semantic_eval.Evaluation) -> dict[str, Any]:
        return semantic_eval.report(evaluation)

    def write_outputs(self, evaluation, data: Path, cfg, out: Path, full: dict[str, Any]) -> None:
        semantic_eval.write_outputs(evaluation, data, cfg, out, full)

    def plots(self, evaluation, full: dict[str, Any]) -> dict[str, list[dict]]:
        bars, rows = semantic_eval.plot_rows(evaluation, full)
        return {semantic_eval.PER_CLASS_PLOT: bars, semantic_eval.CONFUSION_PLOT: rows}

    answers = semantic_answers.ANSWERS
    query_options = semantic_answers.QUERY_OPTIONS

    def predict(self, predictor, images):
        return predictor.masks(images)

    def answer(self, options, image, prediction, meta):
        return semantic_answers.answer(options, image, prediction, meta)
