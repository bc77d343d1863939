"""IoU-balanced classification of Mask R-CNN's box head (``pipeline.models.iou_balanced``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from pipeline.config.model_params import ModelParams
from pipeline.config.params import LossParams
from pipeline.models.iou_balanced import BOX_SAMPLES, iou_balanced_ce, paired_iou, take_box_samples
from pipeline.models.registry import build_model
from pipeline.tasks.instance import INSTANCE_LOSS_TERMS, InstanceTask, MaskRCNNLoss

BASE = dict(family="torchvision", arch="maskrcnn_mobilenet_v2_fpn", encoder_weights=None, in_channels=3,
            classes=None, image_scale=1.0, trainable_layers=3, kwargs={})


def samples(ce, positive, iou):
    return {"ce": torch.tensor(ce, requires_grad=True), "positive": torch.tensor(positive),
            "iou": torch.tensor(iou)}


def test_paired_iou_is_the_diagonal_of_torchvisions_box_iou():
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(20, 2, generator=gen) * 50
    a = torch.cat([corners, corners + torch.rand(20, 2, generator=gen) * 30 + 1], 1)
    b = a + torch.randn(20, 4, generator=gen) * 5
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1)
    torch.testing.assert_close(paired_iou(a, b), box_iou(a, b).diagonal())


def test_the_loss_is_plain_cross_entropy_without_balancing_and_shifts_weight_to_well_placed_boxes():
    s = samples([1.0, 2.0, 0.5, 3.0], [True, True, False, False], [0.9, 0.3, 0.0, 0.0])
    plain = s["ce"].mean()
    assert iou_balanced_ce(s, 0.0).item() == pytest.approx(plain.item())
    same = samples([1.0, 2.0, 0.5, 3.0], [True, True, False, False], [0.6, 0.6, 0.0, 0.0])
    assert iou_balanced_ce(same, 1.5).item() == pytest.approx(plain.item())
    loss = iou_balanced_ce(s, 1.5)
    loss.backward()
    grad = s["ce"].grad * 4                          # the weights (the mean divides by 4)
    assert grad[0] > 1 > grad[1] and grad[2] == grad[3] == 1
    assert (grad[:2] * s["ce"][:2]).sum().item() == pytest.approx(3.0)   # the positives' total kept
    assert loss.item() == pytest.approx(plain.item())                   # so the loss value too


def test_a_mask_rcnn_training_step_keeps_what_its_classifier_loss_is_made_of():
    torch.manual_seed(0)
    model = build_model(ModelParams.model_validate(BASE), 2).train()
    x = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 50.0, 90.0, 80.0]]),
                "labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 96, 96, dtype=torch.uint8)}
               for _ in range(2)]
    for t in targets:
        t["masks"][0, 12:50, 10:40] = t["masks"][1, 50:80, 50:90] = 1
    losses = model(x, targets)
    kept = take_box_samples(model)
    assert set(losses) == set(INSTANCE_LOSS_TERMS.values())          # the loss dict stays torchvision's
    assert kept["ce"].mean().item() == pytest.approx(losses["loss_classifier"].item(), rel=1e-5)
    assert kept["positive"].any() and ((kept["iou"] >= 0) & (kept["iou"] <= 1)).all()
    with pytest.raises(RuntimeError, match="kept no samples"):
        take_box_samples(model)                                       # handed over once

    weights = {"rpn_objectness": 1, "rpn_box": 1, "box_reg": 1, "mask": 1, "iou_balanced_classifier": 1}
    loss_fn = InstanceTask().build_loss(LossParams.defaults(terms=weights), 2, 255, None)
    assert isinstance(loss_fn, MaskRCNNLoss) and loss_fn.needs_box_samples and loss_fn.eta == 1.5
    loss = InstanceTask().training_loss(model, x, targets, loss_fn)
    loss.backward()
    assert torch.isfinite(loss) and model.net.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_the_terms_take_iou_balanced_classification_in_place_of_the_classifier_only():
    five = dict.fromkeys(INSTANCE_LOSS_TERMS, 1.0)
    both = LossParams.defaults(terms=five | {"iou_balanced_classifier": 1.0})
    with pytest.raises(ValueError, match="classifier and iou_balanced_classifier are two forms"):
        InstanceTask().build_loss(both, 2, 255, None)
    neither = LossParams.defaults(terms={k: v for k, v in five.items() if k != "classifier"})
    with pytest.raises(ValueError, match="missing classifier"):
        InstanceTask().build_loss(neither, 2, 255, None)
    plain = InstanceTask().build_loss(LossParams.defaults(terms=five), 2, 255, None)
    assert not plain.needs_box_samples
    ones = {key: torch.tensor(1.0) for key in INSTANCE_LOSS_TERMS.values()}
    assert float(plain(ones)) == 5.0
    four = {k: 1.0 for k in five if k != "classifier"}
    balanced = InstanceTask().build_loss(
        LossParams.defaults(terms=four | {"iou_balanced_classifier": 2.0}), 2, 255, None)
    s = samples([1.0, 3.0], [True, False], [0.5, 0.0])
    assert float(balanced(ones | {BOX_SAMPLES: s})) == pytest.approx(4.0 + 2 * F.relu(s["ce"]).mean().item())
