"""The panoptic task on a tiny synthetic set: batches keep ids, masks, boxes and the semantic
map aligned, Panoptic FPN trains through the engine's loop and is scored with PQ, the
evaluate stage writes COCO panoptic files that score as its report says, and the answers
decode back to the prediction."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.model_params import ModelParams
from pipeline.config.params import EvaluateParams, LossParams, TrainParams
from pipeline.data import panoptic_batches, shards
from pipeline.engine.loop import build_optimizer, build_scheduler, evaluate, train_one_epoch
from pipeline.metrics.panoptic import PanopticMetric
from pipeline.metrics.panoptic_types import Panoptic, Segment, decode_png, rgb_to_ids
from pipeline.models.base import ModelMeta
from pipeline.models.registry import build_model
from pipeline.tasks import get_task
from pipeline.tasks import panoptic_eval as pe
from tests.factories import PANOPTIC_CLASSES, PANOPTIC_PALETTE, make_panoptic_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOSS_TERMS = {"rpn_objectness": 1.0, "rpn_box": 1.0, "classifier": 1.0, "box_reg": 1.0, "mask": 1.0,
              "semantic": 0.5}
IGNORE = 255


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_panoptic_dataset(tmp_path_factory.mktemp("panoptic"))


def rows(data, split):
    table = shards.read_split(data, split)
    task = get_task("panoptic")
    return table.column("image").to_pylist(), task.targets_of({c: table.column(c).to_pylist()
                                                                for c in task.target_columns})


def model_cfg(**kw):
    raw = dict(family="torchvision", arch="panoptic_fpn_mobilenet_v2", encoder_weights=None, in_channels=3,
               classes=None, image_scale=1.0, trainable_layers=6, kwargs={})
    return ModelParams.model_validate(raw | kw)


def panoptic_model(seed=0):
    torch.manual_seed(seed)
    meta = ModelMeta(class_names=PANOPTIC_CLASSES, palette=PANOPTIC_PALETTE,
                     ignore_index=IGNORE, task="panoptic", thing_classes=(2,))
    return build_model(model_cfg(), 3, meta)


def test_collate_keeps_ids_masks_boxes_and_semantic_aligned_through_augmentation(data):
    images, targets = rows(data, "train")
    task = get_task("panoptic")
    transform = task.train_transform((48, 64), (0.75, 1.25), 0.0, IGNORE)
    transform.set_random_seed(5)
    x, batch = task.collate(images, targets, mean=MEAN, std=STD, ignore_index=IGNORE, transform=transform)
    assert x.shape == (len(images), 3, 48, 64)
    pixels = (x.numpy().transpose(0, 2, 3, 1) * STD + MEAN) * 255
    assert sum(len(t["labels"]) for t in batch) > len(batch)     # stuff and some cars in the crops
    for i, target in enumerate(batch):
        assert "truth" not in target
        semantic = target["semantic"].numpy()
        red = (pixels[i][..., 0] > 150) & (pixels[i][..., 2] < 90)
        # Every car pixel is labelled car in the semantic map (up to the resize's blurred edges).
        cars = semantic == 2
        assert (red & cars).sum() >= 0.85 * (red | cars).sum()
        for box, label, mask in zip(target["boxes"].numpy(), target["labels"].numpy(),
                                    target["masks"].numpy().astype(bool), strict=True):
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
            assert (semantic[mask] == label).all()         # masks and semantic map from the same ids
        # Padding (scale below 1) is void: ignored by the semantic map, in no mask.
        assert set(np.unique(semantic)) <= {0, 1, 2, IGNORE}


def test_validation_batches_carry_the_truth_and_leave_crowds_out_of_the_targets():
    ids = np.zeros((20, 30), np.int32)
    ids[:10], ids[10:], ids[12:18, 2:8], ids[12:18, 20:28] = 1, 2, 3, 4
    segments = [{"id": 1, "class": 0, "iscrowd": False}, {"id": 2, "class": 1, "iscrowd": False},
                {"id": 3, "class": 2, "iscrowd": False}, {"id": 4, "class": 2, "iscrowd": True}]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="PNG")
    from pipeline.metrics.panoptic_types import encode_png

    _, (target,) = panoptic_batches.collate([buf.getvalue()], [(encode_png(ids), segments)], mean=MEAN,
                                            std=STD, ignore_index=IGNORE)
    assert target["labels"].tolist() == [0, 1, 2]                 # the crowd is no target
    semantic = target["semantic"].numpy()
    assert (semantic[12:18, 20:28] == IGNORE).all() and (semantic[12:18, 2:8] == 2).all()
    truth = target["truth"]
    assert [s.iscrowd for s in truth.segments] == [False, False, False, True]
    assert (truth.ids == ids).all()


def test_loss_terms_of_other_tasks_are_refused_naming_panoptic_fpn_s():
    task = get_task("panoptic")
    with pytest.raises(ValueError, match="semantic"):
        task.build_loss(LossParams.defaults(terms={"dice": 1.0}), 3, IGNORE, None)
    with pytest.raises(ValueError, match="missing semantic"):
        task.build_loss(LossParams.defaults(terms={k: v for k, v in LOSS_TERMS.items() if k != "semantic"}),
                        3, IGNORE, None)


def test_panoptic_fpn_trains_through_the_engine_and_validation_scores_pq(data):
    task = get_task("panoptic")
    model = panoptic_model()
    cfg = TrainParams.defaults(epochs=1, batch_size=4, lr=1e-3, crop_size=[48, 64], scale_range=[1.0, 1.0],
                               color_jitter=0.0, amp=False, channels_last=False)
    loss_fn = task.build_loss(LossParams.defaults(terms=LOSS_TERMS), 3, IGNORE, None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 4)
    images, targets = rows(data, "train")
    transform = task.train_transform((48, 64), (1.0, 1.0), 0.0, IGNORE)
    batches = [task.collate(images[i:i + 4], targets[i:i + 4], mean=MEAN, std=STD, ignore_index=IGNORE,
                            transform=transform) for i in range(0, 8, 4)]
    cpu = torch.device("cpu")
    stats = train_one_epoch(model, iter(batches * 2), loss_fn, optimizer, scheduler, cfg, cpu, task=task)
    assert stats["images"] == 16 and np.isfinite(stats["loss"])
    val_images, val_targets = rows(data, "val")
    val = [task.collate(val_images, val_targets, mean=MEAN, std=STD, ignore_index=IGNORE)]
    metric, loss = evaluate(model, iter(val), task.metric(3, IGNORE, cpu, (2,)), cpu, loss_fn, task=task)
    assert np.isnan(loss)                                 # Panoptic FPN takes no losses in eval mode
    scores = task.epoch_metrics(metric.compute(), PANOPTIC_CLASSES)
    assert {"val_pq", "val_pq_things", "val_pq_stuff", "val_miou", "val_pq_car"} <= set(scores)
    assert 0.0 <= scores["val_pq"] <= 1.0
    headline, plots = task.training_summary(scores | {"epoch": 0})
    assert headline["best_val_pq"] == scores["val_pq"]
    assert [r["class"] for r in plots["val_pq.json"]] == list(PANOPTIC_CLASSES)


class Oracle:
    """A predictor answering each test image's truth, with one car missed in the first image."""

    def __init__(self, data):
        self.truth = [t for _, _, t in shards.iter_panoptic_samples(data, "test")]
        self.k = 0

    def panoptic(self, images):
        truth = self.truth[self.k]
        self.k += 1
        if self.k == 1:
            car = next(s for s in truth.segments if s.category == 2)
            ids = np.where(truth.ids == car.id, 0, truth.ids)
            return [Panoptic(ids, [s for s in truth.segments if s.id != car.id])]
        return [truth]


def test_evaluate_writes_coco_panoptic_files_that_score_as_the_report_says(data, tmp_path):
    task = get_task("panoptic")
    model = SimpleNamespace(meta=SimpleNamespace(class_names=PANOPTIC_CLASSES, thing_classes=(2,)))
    cfg = EvaluateParams.defaults(split="test")
    ev = task.evaluate_split(model, data, cfg, Oracle(data))
    report = task.report(ev)
    assert report["pq_stuff"] == pytest.approx(1.0)
    assert 0.5 < report["pq_things"] < 1.0 and report["segments"]["fn"] == 1
    out = tmp_path / "evaluation"
    full = report | {"split": "test", "split_version": "v", "eval_key": "k", "settings": {},
                     "mlflow_run_id": None, "data_version": "d"}
    task.write_outputs(ev, data, cfg, out, full)
    index = json.loads((out / pe.INDEX_FILE).read_text())
    assert index["worst"][0] == "test-000" and (out / index["images"][0]["files"]["panel"]).is_file()
    # PQ again from the COCO panoptic files alone.
    truth, predictions = (json.loads((out / f).read_text()) for f in (pe.TRUTH_FILE, pe.PREDICTIONS_FILE))
    isthing = [bool(c["isthing"]) for c in truth["categories"]]
    again = PanopticMetric([c["name"] for c in truth["categories"]], isthing, IGNORE)
    for t, p in zip(truth["annotations"], predictions["annotations"], strict=True):
        def read(annotation, folder):
            ids = rgb_to_ids(np.asarray(Image.open(out / folder / annotation["file_name"])))
            return Panoptic(ids, [Segment(s["id"], s["category_id"], bool(s["iscrowd"]))
                                  for s in annotation["segments_info"]])
        again.update([read(p, pe.PREDICTION_PNGS)], [read(t, pe.TRUTH_PNGS)])
    assert again.compute()["pq"] == pytest.approx(report["pq"], abs=1e-12)
    plots = task.plots(ev, full)
    assert [r["class"] for r in plots[pe.PQ_PLOT]] == list(PANOPTIC_CLASSES)


def test_answers_decode_back_to_the_prediction(data):
    from pycocotools import mask as rle

    task = get_task("panoptic")
    _, image, truth = next(shards.iter_panoptic_samples(data, "test"))
    meta = SimpleNamespace(class_names=PANOPTIC_CLASSES, thing_classes=(2,),
                           palette=PANOPTIC_PALETTE)
    png, media = task.answer(SimpleNamespace(format="png", alpha=0.5, task_options={}), image, truth, meta)
    assert media == "image/png"
    picture = Image.open(io.BytesIO(png))
    assert (decode_png(png) == truth.ids).all()
    info = json.loads(picture.text["segments_info"])
    assert [(s["id"], s["category"], s["isthing"]) for s in info] == [
        (s.id, PANOPTIC_CLASSES[s.category], int(s.category == 2)) for s in truth.segments]
    body, media = task.answer(SimpleNamespace(format="json", alpha=0.5, task_options={}), image, truth, meta)
    assert media == "application/json"
    for s in body["segments_info"]:
        mask = rle.decode({"size": s["mask"]["size"], "counts": s["mask"]["counts"].encode()})
        assert (mask.astype(bool) == (truth.ids == s["id"])).all() and mask.sum() == s["area"]
        x0, y0, x1, y1 = s["box"]
        assert s["bbox"] == [x0, y0, x1 - x0, y1 - y0]
    options = SimpleNamespace(format="overlay", alpha=0.5, task_options={})
    jpeg, media = task.answer(options, image, truth, meta)
    assert media == "image/jpeg" and Image.open(io.BytesIO(jpeg)).size == (image.shape[1], image.shape[0])
