"""``task: instance`` through every stage on tiny generated nuclei: prepare (dsb2018 layout),
train (Mask R-CNN, two Ray Train workers, one MLflow run), evaluate (COCO AP that anyone can
recompute from the files written), register (gated on mask AP) and the champion served over
HTTP."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import train as train_stage
from pipeline.artifacts.model_dir import load_model
from pipeline.evaluate import evaluate
from pipeline.register import RegisterError, register
from pipeline.tasks import get_task
from pipeline.tasks.instance_eval import PREDICTIONS_FILE, TRUTH_FILE
from tests.conftest import only_run
from tests.factories import ServeProcess, free_port, instance_params

TINY = {
    "model": {"encoder_weights": None, "image_scale": 1.0,
              "kwargs": {"box_detections_per_img": 50, "rpn_pre_nms_top_n_train": 200,
                         "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 200,
                         "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
                         "box_score_thresh": 0.0}},     # an untrained model still answers something
    "train": {"epochs": 2, "batch_size": 2, "val_batch_size": 2, "crop_size": [64, 64], "warmup_epochs": 0.2,
              "num_workers": 2, "cpus_per_worker": 0.5, "threads_per_worker": 1},
    "evaluate": {"overlays": {"samples": 2, "worst_per_class": 1}},
    "register": {"model_name": "tiny-nuclei"},
}


def recompute_ap(folder) -> float:
    """Mask AP from the evaluation folder's COCO files alone, with pycocotools as any user would
    (the detection cap at the largest image's count, as the report reads it)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads((folder / TRUTH_FILE).read_text())
    gt.createIndex()
    dt = gt.loadRes(json.loads((folder / PREDICTIONS_FILE).read_text()))
    ev = COCOeval(gt, dt, iouType="segm")
    ev.params.maxDets = [1, 10, 300]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    return float(precision[precision > -1].mean())


@pytest.mark.slow     # about 100 s: Ray Train, MLflow and a Serve process
def test_instance_task_through_train_evaluate_register_and_answers(nuclei, env, local_ray):
    params = instance_params(env / "params.yaml", **TINY)
    summary = train_stage.train(nuclei, env / "model", env / "metrics.json", params, env / "ray_results",
                                plots_dir=env / "plots")
    assert set(summary) >= {"best_val_mask_ap", "best_epoch", "val_mask_ap50", "val_dsb_score"}
    assert json.loads((env / "plots" / "val_ap.json").read_text())[0]["class"] == "nucleus"
    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    history = client.get_metric_history(run.info.run_id, "val_mask_ap")
    assert [m.step for m in history] == [0, 1]

    model = load_model(env / "model")
    assert type(model).__name__ == "InstanceModel" and model.meta.task == "instance"

    full = evaluate(env / "model", nuclei, env / "evaluation", env / "eval.json", env / "eval-plots", params)
    card = json.loads((nuclei / "card.json").read_text())
    assert full["primary_metric"] == "mask_ap" and full["images"] == card["splits"]["test"]["images"] > 0
    assert full["instances"]["truth"] > 0 and full["instances"]["predicted"] > 0
    assert set(json.loads((env / "eval.json").read_text())) == {"eval_key", "mask_ap", "mask_ap50",
                                                                 "mask_ap75",
                                                                 "box_ap", "dsb_score"}
    assert recompute_ap(env / "evaluation") == pytest.approx(full["mask_ap"], abs=1e-9)
    index = json.loads((env / "evaluation" / "index.json").read_text())
    panels = [e["files"]["panel"] for e in index["images"] if e["files"]]
    assert panels and all((env / "evaluation" / p).is_file() for p in panels)
    pr = json.loads((env / "eval-plots" / "precision_recall.json").read_text())
    assert len(pr) == 101
    assert set(pr[0]) == {"recall", "precision_iou50", "precision_iou75", "precision_iou50_95"}
    assert [row["precision_iou50"] for row in pr] == full["pr_curve"]["0.50"]

    report = env / "evaluation" / "evaluate.json"
    with_onnx = instance_params(env / "onnx.yaml", **{**TINY, "register": {**TINY["register"], "onnx": True}})
    with pytest.raises(RegisterError, match="register.onnx"):
        register(env / "model", report, nuclei, env / "registry.json", with_onnx)
    decision = register(env / "model", report, nuclei, env / "registry.json", params)
    assert decision.promoted and decision.score_metric == "mask_ap"
    version = client.get_model_version("tiny-nuclei", decision.version)
    assert version.tags["task"] == "instance" and version.tags["score_metric"] == "mask_ap"

    # The champion served over HTTP answers what the model predicts in-process.
    task = get_task("instance")
    image = np.zeros((70, 90, 3), np.uint8)
    image[20:36, 30:46] = 200
    (prediction,) = task.predict(task.predictor(model), [image])
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    port = free_port()
    serve_params = instance_params(env / "serve.yaml", **{**TINY, "serve": {"port": port, "threads": 1}})
    with ServeProcess(serve_params, port, env, dict(os.environ), env / "serve.log") as server:
        status, _, meta = server.request("GET", "/metadata")
        meta = json.loads(meta)
        assert status == 200 and meta["task"] == "instance" and set(meta["query_options"]) == {
            "score_threshold", "max_instances", "refine"}
        status, media, body = server.predict(buf.getvalue(), query="?score_threshold=0")
        answer = json.loads(body)
        assert status == 200 and media == "application/json" and answer["width"] == 90
        assert [i["score"] for i in answer["instances"]] == pytest.approx(prediction.scores, abs=1e-6)
        assert [i["mask"] for i in answer["instances"]] == prediction.masks
        status, _, body = server.predict(buf.getvalue(), query="?score_threshold=0&max_instances=2")
        assert len(json.loads(body)["instances"]) == min(2, len(prediction))
        status, media, png = server.predict(buf.getvalue(), query="?format=png&score_threshold=0")
        ids = Image.open(io.BytesIO(png))
        assert media == "image/png" and ids.size == (90, 70)
        assert len(json.loads(ids.text["instances"])) == len(prediction)
        status, media, _ = server.predict(buf.getvalue(), query="?format=overlay")
        assert status == 200 and media == "image/jpeg"
        status, _, body = server.predict(buf.getvalue(), query="?refine=grabcut&score_threshold=0")
        assert status == 200 and len(json.loads(body)["instances"]) <= len(prediction)    # GrabCut each
        status, _, body = server.predict(buf.getvalue(), query="?refine=crf")
        assert status == 400 and "refine='crf' is not one of none, grabcut" in json.loads(body)["error"]
        for bad in ("?max_instances=0", "?score_threshold=2", "?score_threshold=x", "?min_score=0.5"):
            status, _, body = server.predict(buf.getvalue(), query=bad)
            assert status == 400 and bad[1:].split("=")[0] in json.loads(body)["error"], (bad, body)
        assert server.request("GET", "/health")[0] == 200
