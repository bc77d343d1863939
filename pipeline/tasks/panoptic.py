"""Panoptic segmentation: every pixel a class, and pixels of thing classes an instance too.

Targets are the prepared rows' ``panoptic`` PNG and ``segments`` (``pipeline.data.shards``;
batches by ``pipeline.data.panoptic_batches``); the model (family ``torchvision``, arch
``panoptic_fpn_mobilenet_v2``) takes its losses itself, and ``loss.terms`` weighs them
(Mask R-CNN's five and ``semantic``, ``PANOPTIC_LOSS_TERMS``). Validation fuses each image's
instances and semantic map (``pipeline.inference.panoptic``) and scores the split with PQ
(``pipeline.metrics.panoptic``): PQ over all classes is the primary score, with PQ of things
and of stuff, SQ, RQ and the mIoU of the panoptic output's semantic view. The evaluate
stage's scores and pictures: ``pipeline.tasks.panoptic_eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.data import augment, panoptic_batches
from pipeline.inference.panoptic import PanopticPredictor
from pipeline.metrics.panoptic import PanopticMetric
from pipeline.metrics.panoptic_types import VOID
from pipeline.tasks import panoptic_answers, panoptic_eval
from pipeline.tasks.instance import IOU_BALANCED, PANOPTIC_LOSS_TERMS, PanopticFPNLoss, check_terms
from pipeline.tasks.own_loss import OwnLossTask, nan_for_none

PQ_PLOT = "val_pq.json"
HEADLINE = ("pq", "pq_things", "pq_stuff", "sq", "rq", "miou")


class ValidationMetric(PanopticMetric):
    """``PanopticMetric`` fed by the engine: outputs are predicted ``Panoptic``s
    (``PanopticTask.validation_step``), targets the batches' dicts holding the "truth"."""

    def update(self, outputs, targets) -> None:
        super().update(outputs, [t["truth"] for t in targets])


class PanopticTask(OwnLossTask):
    name = "panoptic"
    primary_metric = "pq"
    primary_label = "PQ"
    labels = {"pq": "PQ", "pq_things": "PQ things", "pq_stuff": "PQ stuff", "sq": "SQ", "rq": "RQ",
              "miou": "semantic-view mIoU"}
    per_class_keys = ("pq", "sq", "rq", "iou")
    views = ("pq_table", "overlays")
    target_columns = ("panoptic", "segments")
    evaluation = panoptic_eval            # the evaluate stage's scores and pictures
    answering = panoptic_answers          # /predict's answers
    predictor_class = PanopticPredictor
    tiles = False                         # whole images up to tile_above_pixels (PanopticPredictor)
    answers = panoptic_answers.ANSWERS
    query_options = panoptic_answers.QUERY_OPTIONS

    def train_transform(self, crop, scale, jitter, ignore_index):
        # The segment-id map moves with the image; padding is void (no segment).
        return augment.train_transform(crop, scale, jitter, VOID)

    def collate(self, images, targets, *, mean, std, ignore_index, transform=None):
        return panoptic_batches.collate(images, targets, mean=mean, std=std, ignore_index=ignore_index,
                                        transform=transform)

    def validation_step(self, model, images, targets, loss_fn):
        """Predicted ``Panoptic``s of the batch's images (fused with the default settings);
        Panoptic FPN takes no losses in eval mode."""
        predictor = PanopticPredictor(model)
        outputs = model(images)
        predicted = [predictor.fused(output, t["truth"].height, t["truth"].width)
                     for output, t in zip(outputs, targets, strict=True)]
        return predicted, None

    def build_loss(self, loss_cfg, num_classes, ignore_index, class_weights) -> nn.Module:
        unknown = sorted(set(loss_cfg.terms) - set(PANOPTIC_LOSS_TERMS) - {IOU_BALANCED})
        if unknown:
            raise ValueError(
                f"loss.terms: {', '.join(unknown)} are not losses of Panoptic FPN; the panoptic task "
                f"weighs its own losses: {', '.join(PANOPTIC_LOSS_TERMS)} ({IOU_BALANCED} in place of "
                "classifier)")
        check_terms(loss_cfg.terms, PANOPTIC_LOSS_TERMS, "panoptic", "Panoptic FPN")
        return PanopticFPNLoss(dict(loss_cfg.terms), loss_cfg.iou_balance_eta)

    def metric(self, num_classes: int, ignore_index: int, device: torch.device,
               thing_classes: Sequence[int] = ()) -> ValidationMetric:
        things = set(thing_classes)
        return ValidationMetric([str(c) for c in range(num_classes)],
                                [c in things for c in range(num_classes)], ignore_index)

    def epoch_metrics(self, computed: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
        out = {f"val_{key}": nan_for_none(computed[key]) for key in HEADLINE}
        for name, scores in zip(class_names, computed["per_class"].values(), strict=True):
            out[f"val_pq_{name}"] = nan_for_none(scores["pq"])
        return out

    def training_summary(self, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
        headline = {
            f"best_val_{self.primary_metric}": best[f"val_{self.primary_metric}"],
            "best_epoch": int(best["epoch"]) + 1,
            "val_pq_things": best["val_pq_things"], "val_pq_stuff": best["val_pq_stuff"],
            "val_miou": best["val_miou"],
        }
        per_class = [{"class": k.removeprefix("val_pq_"), "pq": v} for k, v in best.items()
                     if k.startswith("val_pq_") and k not in ("val_pq_things", "val_pq_stuff")]
        return headline, {PQ_PLOT: per_class}

    # --- serving: pipeline.inference.panoptic, pipeline.tasks.panoptic_answers ---------------
    def predict(self, predictor, images):
        return predictor.panoptic(images)
