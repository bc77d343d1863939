"""The instance task on synthetic rows: batches keep masks and boxes aligned, Mask R-CNN
trains through the engine's loop, and validation scores with COCOeval."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as rle

from pipeline.config.model_params import ModelParams
from pipeline.config.params import LossParams, TrainParams
from pipeline.data import instance_batches
from pipeline.engine.loop import build_optimizer, build_scheduler, evaluate, train_one_epoch
from pipeline.models.registry import build_model
from pipeline.tasks import get_task

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOSS_TERMS = {"rpn_objectness": 1.0, "rpn_box": 1.0, "classifier": 1.0, "box_reg": 1.0, "mask": 1.0}


def blob_row(rng: np.random.Generator, h: int = 96, w: int = 112, n: int = 3, crowd: bool = False):
    """A dark image with ``n`` bright rectangles (class 0, or 1 when wider than tall) and its
    instance row (the prepared shard's form)."""
    image = np.full((h, w, 3), 20, np.uint8)
    instances = []
    for k in range(n):
        bh, bw = rng.integers(10, 24, size=2)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        image[y:y + bh, x:x + bw] = 220
        mask = np.zeros((h, w), np.uint8)
        mask[y:y + bh, x:x + bw] = 1
        code = rle.encode(np.asfortranarray(mask))
        instances.append({"class": int(bw > bh), "box": np.asarray([x, y, x + bw, y + bh], np.float32),
                          "iscrowd": crowd and k == 0, "rle": code["counts"]})
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue(), instances


def model_cfg(**kw):
    raw = dict(family="torchvision", arch="maskrcnn_mobilenet_v2_fpn", encoder_weights=None, in_channels=3,
               classes=None, image_scale=1.0, trainable_layers=6, kwargs={})
    return ModelParams.model_validate(raw | kw)


def test_collate_keeps_masks_and_boxes_aligned_through_augmentation():
    rng = np.random.default_rng(0)
    rows = [blob_row(rng) for _ in range(4)]
    transform = instance_batches.train_transform((64, 80), (0.75, 1.25), 0.0)
    transform.set_random_seed(3)
    x, targets = instance_batches.collate([r[0] for r in rows], [r[1] for r in rows], mean=MEAN, std=STD,
                                          ignore_index=255, transform=transform)
    assert x.shape == (4, 3, 64, 80)
    image = (x.numpy().transpose(0, 2, 3, 1) * STD + MEAN) * 255
    for i, target in enumerate(targets):
        assert "truth" not in target                      # training batches carry no scoring truth
        masks = target["masks"].numpy().astype(bool)
        for box, mask in zip(target["boxes"].numpy(), masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
        # The masks cover the bright pixels of the moved image (up to the resize's blurred edges).
        bright, covered = image[i].mean(axis=-1) > 120, masks.any(axis=0)
        assert (bright & covered).sum() / (bright | covered).sum() > 0.9


def test_validation_batches_keep_crowd_as_truth_not_as_targets():
    rng = np.random.default_rng(1)
    data, instances = blob_row(rng, n=3, crowd=True)
    _, (target,) = instance_batches.collate([data], [instances], mean=MEAN, std=STD, ignore_index=255)
    assert len(target["labels"]) == 2
    assert target["truth"].iscrowd == [1, 0, 0] and len(target["truth"]) == 3


def test_semantic_loss_terms_are_refused_with_the_instance_ones_named():
    task = get_task("instance")
    cfg = LossParams.defaults(terms={"dice": 1.0})
    with pytest.raises(ValueError, match="rpn_objectness"):
        task.build_loss(cfg, 2, 255, None)
    with pytest.raises(ValueError, match="missing"):
        task.build_loss(LossParams.defaults(terms={"mask": 1.0}), 2, 255, None)


def test_mask_rcnn_trains_through_the_engine_loop_and_scores():
    torch.manual_seed(0)
    task = get_task("instance")
    rng = np.random.default_rng(2)
    rows = [blob_row(rng) for _ in range(4)]
    cfg = TrainParams.defaults(epochs=1, batch_size=2, crop_size=[64, 80], amp=False, channels_last=False,
                               warmup_epochs=0.0, lr=1e-3)
    model = build_model(model_cfg(), 2)
    loss_fn = task.build_loss(LossParams.defaults(terms=LOSS_TERMS), 2, 255, None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 2)
    transform = task.train_transform((64, 80), (1.0, 1.0), 0.0, 255)
    norm = {"mean": MEAN, "std": STD, "ignore_index": 255}
    batches = [task.collate([r[0] for r in rows[i:i + 2]], [r[1] for r in rows[i:i + 2]], transform=transform,
                            **norm) for i in (0, 2)]
    cpu = torch.device("cpu")
    stats = train_one_epoch(model, batches, loss_fn, optimizer, scheduler, cfg, cpu, task=task)
    assert stats["steps"] == 2 and np.isfinite(stats["loss"]) and stats["loss"] > 0
    val = [task.collate([r[0] for r in rows], [r[1] for r in rows], **norm)]
    metric, loss = evaluate(model, val, task.metric(2, 255, cpu), cpu, loss_fn,
                            task=task)
    scores = task.epoch_metrics(metric.compute(), ["square", "wide"])
    assert np.isnan(loss)                 # Mask R-CNN takes no losses in eval mode
    assert {"val_mask_ap", "val_mask_ap50", "val_box_ap", "val_dsb_score", "val_ap_square",
            "val_ap_wide"} <= set(scores)
    assert 0.0 <= scores["val_dsb_score"] <= 1.0


def test_perfect_predictions_score_one():
    """The metric's plumbing: predictions equal to the truth give mask AP 1 and DSB 1."""
    task = get_task("instance")
    rng = np.random.default_rng(4)
    data, instances = blob_row(rng, n=4)
    _, (target,) = instance_batches.collate([data], [instances], mean=MEAN, std=STD, ignore_index=255)
    output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.linspace(0.9, 0.6, 4),
              "masks": target["masks"][:, None].float()}
    metric = task.metric(2, 255, torch.device("cpu"))
    metric.update([output], [target])
    computed = metric.all_reduce().compute()
    assert computed["mask"]["ap"] == pytest.approx(1.0) and computed["dsb_score"] == pytest.approx(1.0)
