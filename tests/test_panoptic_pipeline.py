"""``task: panoptic`` through every stage on tiny generated street scenes: prepare (a semantic
folder dataset with ``thing_classes``), train (Panoptic FPN, two Ray Train workers, one
MLflow run), evaluate (PQ that a COCO panoptic reader recomputes from the files written),
register (gated on PQ) and the champion served over HTTP."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import train as train_stage
from pipeline.artifacts.model_dir import load_model
from pipeline.config.params import PrepareParams
from pipeline.evaluate import evaluate
from pipeline.metrics.panoptic import PanopticMetric
from pipeline.metrics.panoptic_types import Panoptic, Segment, decode_png, rgb_to_ids
from pipeline.prepare import prepare
from pipeline.register import RegisterError, register
from pipeline.tasks import get_task
from pipeline.tasks import panoptic_eval as pe
from tests.conftest import only_run
from tests.factories import PANOPTIC_CLASSES, ServeProcess, free_port, make_street_folder, recipe_params

RECIPE = "camvid-panoptic"
TINY = {
    "download": {"dataset": "folder", "folder": "raw"},
    "prepare": {"classes": list(PANOPTIC_CLASSES), "thing_classes": ["car"], "workers": 1},
    "model": {"encoder_weights": None,
              "kwargs": {"box_detections_per_img": 20, "rpn_pre_nms_top_n_train": 200,
                         "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 200,
                         "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64}},
    "train": {"epochs": 2, "batch_size": 2, "val_batch_size": 2, "crop_size": [64, 64], "warmup_epochs": 0.2,
              "num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
    "evaluate": {"overlays": {"samples": 2, "worst_per_class": 1}},
    "register": {"model_name": "tiny-streets"},
}


@pytest.fixture(scope="module")
def streets(tmp_path_factory):
    """16 generated 64x80 street scenes (train 8, val 4, test 4; sky and road are stuff, cars
    things), prepared for ``task: panoptic``."""
    root = tmp_path_factory.mktemp("streets")
    make_street_folder(root / "raw")
    cfg = PrepareParams.defaults(task="panoptic", classes=list(PANOPTIC_CLASSES), thing_classes=["car"],
                                 workers=1)
    prepare("folder", root / "raw", root / "prepared", cfg)
    return root / "prepared"


def recompute_pq(folder) -> float:
    """PQ from the evaluation folder's COCO panoptic files alone (JSON + PNGs)."""
    truth, predictions = (json.loads((folder / f).read_text()) for f in (pe.TRUTH_FILE, pe.PREDICTIONS_FILE))
    metric = PanopticMetric([c["name"] for c in truth["categories"]],
                            [bool(c["isthing"]) for c in truth["categories"]])

    def read(annotation, pngs):
        ids = rgb_to_ids(np.asarray(Image.open(folder / pngs / annotation["file_name"]).convert("RGB")))
        return Panoptic(ids, [Segment(s["id"], s["category_id"], bool(s["iscrowd"]))
                              for s in annotation["segments_info"]])

    for t, p in zip(truth["annotations"], predictions["annotations"], strict=True):
        metric.update([read(p, pe.PREDICTION_PNGS)], [read(t, pe.TRUTH_PNGS)])
    return metric.compute()["pq"]


@pytest.mark.slow     # about 100 s: Ray Train, MLflow and a Serve process
def test_panoptic_task_through_train_evaluate_register_and_answers(streets, env, local_ray):
    card = json.loads((streets / "card.json").read_text())
    assert card["task"] == "panoptic"
    params = recipe_params(RECIPE, env / "params.yaml", **TINY)
    summary = train_stage.train(streets, env / "model", env / "metrics.json", params, env / "ray_results",
                                plots_dir=env / "plots")
    assert set(summary) >= {"best_val_pq", "best_epoch", "val_pq_things", "val_pq_stuff", "val_miou"}
    val_pq = json.loads((env / "plots" / "val_pq.json").read_text())
    assert [r["class"] for r in val_pq] == list(PANOPTIC_CLASSES)
    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_pq")] == [0, 1]

    model = load_model(env / "model")
    assert type(model).__name__ == "PanopticModel" and model.meta.task == "panoptic"
    assert model.meta.thing_classes == (2,)

    full = evaluate(env / "model", streets, env / "evaluation", env / "eval.json", env / "eval-plots", params)
    assert full["primary_metric"] == "pq" and full["images"] == card["splits"]["test"]["images"] > 0
    assert full["segments"]["truth"] > 0
    assert set(json.loads((env / "eval.json").read_text())) == {"eval_key", "pq", "pq_things", "pq_stuff",
                                                                 "sq", "rq", "miou"}
    assert recompute_pq(env / "evaluation") == pytest.approx(full["pq"], abs=1e-12)
    index = json.loads((env / "evaluation" / "index.json").read_text())
    panels = [e["files"]["panel"] for e in index["images"] if e["files"]]
    assert panels and all((env / "evaluation" / p).is_file() for p in panels)
    assert [r["class"] for r in json.loads((env / "eval-plots" / pe.PQ_PLOT).read_text())] == list(
        PANOPTIC_CLASSES)

    report = env / "evaluation" / "evaluate.json"
    with_onnx = recipe_params(RECIPE, env / "onnx.yaml",
                              **{**TINY, "register": {**TINY["register"], "onnx": True}})
    with pytest.raises(RegisterError, match="register.onnx"):
        register(env / "model", report, streets, env / "registry.json", with_onnx)
    decision = register(env / "model", report, streets, env / "registry.json", params)
    assert decision.promoted and decision.score_metric == "pq"
    version = client.get_model_version("tiny-streets", decision.version)
    assert version.tags["task"] == "panoptic" and version.tags["score_metric"] == "pq"

    # The champion served over HTTP answers what the model predicts in-process.
    task = get_task("panoptic")
    image = np.zeros((70, 90, 3), np.uint8)
    image[:30], image[30:], image[40:52, 20:32] = (70, 130, 220), (110, 110, 110), (200, 30, 30)
    (prediction,) = task.predict(task.predictor(model), [image])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    port = free_port()
    limit = 100 * 100
    serve = {"port": port, "threads": 1, "tile_above_pixels": limit}
    serve_params = recipe_params(RECIPE, env / "serve.yaml", **{**TINY, "serve": serve})
    with ServeProcess(serve_params, port, env, dict(os.environ), env / "serve.log") as server:
        status, _, meta = server.request("GET", "/metadata")
        meta = json.loads(meta)
        assert status == 200 and meta["task"] == "panoptic" and meta["limits"]["max_pixels"] == limit
        status, media, png = server.predict(buf.getvalue(), query="?format=png")
        assert status == 200 and media == "image/png"
        assert (decode_png(png) == prediction.ids).all()
        info = json.loads(Image.open(io.BytesIO(png)).text["segments_info"])
        assert [(s["id"], s["category_id"]) for s in info] == [(s.id, s.category) for s in prediction.segments
                                                               if (prediction.ids == s.id).any()]
        status, media, body = server.predict(buf.getvalue(), query="?format=json")
        answer = json.loads(body)
        assert status == 200 and media == "application/json" and answer["width"] == 90
        assert [s["id"] for s in answer["segments_info"]] == [s["id"] for s in info]
        status, media, _ = server.predict(buf.getvalue(), query="?format=overlay")
        assert status == 200 and media == "image/jpeg"
        large = io.BytesIO()
        Image.fromarray(np.zeros((101, 100, 3), np.uint8)).save(large, format="PNG")
        status, _, body = server.predict(large.getvalue())
        assert status == 413 and f"{limit:,}" in json.loads(body)["error"]
        assert server.request("GET", "/health")[0] == 200
