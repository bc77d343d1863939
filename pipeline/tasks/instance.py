"""Instance segmentation: each object its own mask, class and score.

Targets are the prepared rows' ``instances`` (``pipeline.data.shards``; batches by
``pipeline.data.instance_batches``); the model (family ``torchvision``, Mask R-CNN) takes
its losses itself, and ``loss.terms`` weighs them (``INSTANCE_LOSS_TERMS``); validation
gathers every image's predicted ``Instances`` and scores the split with COCOeval: mask AP
over IoU 0.50:0.95 is the primary score, with AP50, AP75, box AP and the DSB 2018 score.
The evaluate stage's scores and pictures: ``pipeline.tasks.instance_eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config.params import IOU_BALANCED_LOSS
from pipeline.data import instance_batches
from pipeline.inference.instances import InstancePredictor, to_instances
from pipeline.metrics.instance import Instances, coco_ap, dsb_score
from pipeline.models.iou_balanced import BOX_SAMPLES, iou_balanced_ce
from pipeline.models.panoptic_fpn import SEMANTIC_LOSS
from pipeline.tasks import instance_answers, instance_eval
from pipeline.tasks.own_loss import OwnLossTask, nan_for_none

# loss.terms names for the instance task (params.INSTANCE_LOSS_NAMES) -> Mask R-CNN's loss keys.
INSTANCE_LOSS_TERMS = {"rpn_objectness": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
                       "classifier": "loss_classifier", "box_reg": "loss_box_reg", "mask": "loss_mask"}
# In place of classifier: the box head's IoU-balanced classification (pipeline.models.iou_balanced).
IOU_BALANCED = IOU_BALANCED_LOSS
# The panoptic task's (params.PANOPTIC_LOSS_NAMES): its Mask R-CNN's and its semantic branch's.
PANOPTIC_LOSS_TERMS = INSTANCE_LOSS_TERMS | {"semantic": SEMANTIC_LOSS}
# Panoptic FPN's recipe (Kirillov et al. 2019; detectron2's COCO config): instance losses 1, semantic 0.5.
PANOPTIC_PAPER_WEIGHTS = dict.fromkeys(INSTANCE_LOSS_TERMS, 1.0) | {"semantic": 0.5}
AP_PLOT = "val_ap.json"


class MaskRCNNLoss(nn.Module):
    """The weighted sum of a Mask R-CNN's loss dict (``loss.terms`` weights by our names); with
    ``iou_balanced_classifier``, the box head's IoU-balanced classification loss (exponent
    ``eta``) computed from its ``BOX_SAMPLES`` entry, which the task adds to the dict."""

    terms = INSTANCE_LOSS_TERMS     # our names -> the model's loss keys

    def __init__(self, weights: dict[str, float], eta: float = 1.5):
        super().__init__()
        self.weights = {self.terms[name]: float(w) for name, w in weights.items() if name != IOU_BALANCED}
        self.iou_balanced, self.eta = float(weights.get(IOU_BALANCED, 0.0)), eta

    @property
    def needs_box_samples(self) -> bool:
        return self.iou_balanced > 0

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = sum(w * losses[key].float() for key, w in self.weights.items())
        if self.needs_box_samples:
            total = total + self.iou_balanced * iou_balanced_ce(losses[BOX_SAMPLES], self.eta)
        return total


def check_terms(terms: dict[str, float], known: dict[str, str], task: str, model: str) -> None:
    """``ValueError`` unless ``terms`` weighs each of ``known`` (the model's losses), with
    ``iou_balanced_classifier`` allowed in place of ``classifier``."""
    if IOU_BALANCED in terms and "classifier" in terms:
        raise ValueError("loss.terms: classifier and iou_balanced_classifier are two forms of the box "
                         "head's classification loss; weigh one of them")
    missing = sorted(set(known) - set(terms) - ({"classifier"} if IOU_BALANCED in terms else set()))
    if missing:
        raise ValueError(f"loss.terms: the {task} task needs a weight for each of {model}'s "
                         f"losses; missing {', '.join(missing)}")


class PanopticFPNLoss(MaskRCNNLoss):
    """The weighted sum of a Panoptic FPN's loss dict (``pipeline.models.panoptic_fpn``):
    Mask R-CNN's five and the semantic branch's, weighted by ``loss.terms``
    (``PANOPTIC_LOSS_TERMS``' names). Default: the paper's recipe, ``PANOPTIC_PAPER_WEIGHTS``
    (each instance loss 1, semantic 0.5)."""

    terms = PANOPTIC_LOSS_TERMS

    def __init__(self, weights: dict[str, float] | None = None, eta: float = 1.5):
        super().__init__(PANOPTIC_PAPER_WEIGHTS if weights is None else weights, eta)


class InstanceMetric:
    """Every validation image's truth and predicted ``Instances``; scored at the end."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.truth: list[Instances] = []
        self.predicted: list[Instances] = []

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for output, target in zip(outputs, targets, strict=True):
            truth = target["truth"]
            self.truth.append(truth)
            self.predicted.append(to_instances(output, truth.height, truth.width))

    def all_reduce(self) -> InstanceMetric:
        """Every rank's images on every rank (so each computes the same scores)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.truth, self.predicted))
            self.truth = [t for truth, _ in gathered for t in truth]
            self.predicted = [p for _, predicted in gathered for p in predicted]
        return self

    def compute(self) -> dict[str, Any]:
        if not self.truth:
            raise ValueError("no validation images were scored")
        masks = coco_ap(self.truth, self.predicted, self.class_names, "segm")
        boxes = coco_ap(self.truth, self.predicted, self.class_names, "bbox")
        return {"mask": masks, "box": boxes, "dsb_score": dsb_score(self.truth, self.predicted),
                "images": len(self.truth)}


class InstanceTask(OwnLossTask):
    name = "instance"
    primary_metric = "mask_ap"
    primary_label = "mask AP"
    labels = {"mask_ap": "mask AP", "mask_ap50": "mask AP50", "mask_ap75": "mask AP75",
              "box_ap": "box AP", "dsb_score": "DSB score"}
    per_class_keys = ("mask_ap", "box_ap")
    views = ("ap_table", "overlays")
    target_columns = ("instances",)
    evaluation = instance_eval            # the evaluate stage's scores and pictures
    answering = instance_answers          # /predict's answers and query parameters
    predictor_class = InstancePredictor
    answers = instance_answers.ANSWERS
    query_options = instance_answers.QUERY_OPTIONS

    def train_transform(self, crop, scale, jitter, ignore_index):
        return instance_batches.train_transform(crop, scale, jitter)

    def collate(self, images, targets, *, mean, std, ignore_index, transform=None):
        return instance_batches.collate(images, targets, mean=mean, std=std, ignore_index=ignore_index,
                                        transform=transform)

    def validation_step(self, model, images, targets, loss_fn):
        return model(images), None     # Mask R-CNN takes no losses in eval mode

    def build_loss(self, loss_cfg, num_classes, ignore_index, class_weights) -> nn.Module:
        unknown = sorted(set(loss_cfg.terms) - set(INSTANCE_LOSS_TERMS) - {IOU_BALANCED})
        if unknown:
            raise ValueError(
                f"loss.terms: {', '.join(unknown)} are semantic-segmentation losses; the instance task "
                f"weighs Mask R-CNN's own losses: {', '.join(INSTANCE_LOSS_TERMS)} "
                "(e.g. terms: {rpn_objectness: 1, rpn_box: 1, classifier: 1, box_reg: 1, mask: 1}; "
                f"{IOU_BALANCED} in place of classifier)")
        check_terms(loss_cfg.terms, INSTANCE_LOSS_TERMS, "instance", "Mask R-CNN")
        return MaskRCNNLoss(dict(loss_cfg.terms), loss_cfg.iou_balance_eta)

    def metric(self, num_classes: int, ignore_index: int, device: torch.device,
               thing_classes: Sequence[int] = ()) -> InstanceMetric:
        return InstanceMetric(self.class_names_for(num_classes))

    @staticmethod
    def class_names_for(num_classes: int) -> list[str]:
        # COCOeval needs the class ids only; the names come back in epoch_metrics.
        return [str(c) for c in range(num_classes)]

    def epoch_metrics(self, computed: dict[str, Any], class_names: Sequence[str]) -> dict[str, float]:
        mask, box = computed["mask"], computed["box"]
        out = {"val_mask_ap": nan_for_none(mask["ap"]), "val_mask_ap50": nan_for_none(mask["ap50"]),
               "val_mask_ap75": nan_for_none(mask["ap75"]), "val_box_ap": nan_for_none(box["ap"]),
               "val_dsb_score": computed["dsb_score"]}
        for name, ap in zip(class_names, mask["per_class"].values(), strict=True):
            out[f"val_ap_{name}"] = nan_for_none(ap)
        return out

    def training_summary(self, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[dict]]]:
        headline = {
            f"best_val_{self.primary_metric}": best[f"val_{self.primary_metric}"],
            "best_epoch": int(best["epoch"]) + 1,
            "val_mask_ap50": best["val_mask_ap50"], "val_dsb_score": best["val_dsb_score"],
        }
        per_class = [{"class": k.removeprefix("val_ap_"), "mask_ap": v}
                     for k, v in best.items() if k.startswith("val_ap_")]
        return headline, {AP_PLOT: per_class}

    # --- serving: pipeline.inference.instances, pipeline.tasks.instance_answers --------------
    def predict(self, predictor, images):
        return predictor.instances(images)
