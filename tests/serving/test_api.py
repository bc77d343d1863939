"""The serving logic without a server: options, multipart, answers, batches of mixed sizes,
model resolution against a real MLflow store."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config.params import ModelParams, ServeParams
from pipeline.inference.predictor import Predictor
from pipeline.models.base import ModelMeta
from pipeline.models.registry import build_model
from pipeline.serving import api
from pipeline.serving.service import ModelRef, Service, resolve_model
from pipeline.tasks.options import INTEGER, NUMBER, QueryOption
from pipeline.tasks.semantic_answers import ANSWERS, mask_summary
from tests.conftest import CLASSES
from tests.factories import registered_model, repo_params, tracked_model


def test_options():
    assert api.parse_options([], ANSWERS) == api.Options("png", 0.5)
    assert api.parse_options([("format", "JSON")], ANSWERS) == api.Options("json", 0.5)
    overlay = api.parse_options([("format", "overlay"), ("alpha", "0.25")], ANSWERS, 0.7)
    assert overlay == api.Options("overlay", 0.25)
    for query, words in [([("format", "gif")], "format='gif'"), ([("alpha", "nan")], "alpha"),
                         ([("alpha", "-0.1")], "alpha"), ([("x", "1")], "unknown query parameter 'x'"),
                         ([("format", "png"), ("format", "png")], "more than once")]:
        with pytest.raises(api.ApiError, match=words) as err:
            api.parse_options(query, ANSWERS)
        assert err.value.status == 400


TASK_OPTIONS = {"score_threshold": QueryOption(NUMBER, 0.0, 1.0, 0.5),
                "max_instances": QueryOption(INTEGER, 1, 1000)}


def test_task_query_options_are_parsed_with_their_defaults():
    assert api.parse_options([], ANSWERS, task_options=TASK_OPTIONS) == api.Options(
        "png", 0.5, {"score_threshold": 0.5, "max_instances": None})
    got = api.parse_options([("max_instances", "7"), ("score_threshold", "0.25")], ANSWERS,
                            task_options=TASK_OPTIONS)
    assert got.task_options == {"score_threshold": 0.25, "max_instances": 7}
    assert isinstance(got.task_options["max_instances"], int)
    assert api.parse_options([("max_instances", "1000")], ANSWERS, task_options=TASK_OPTIONS
                             ).task_options["max_instances"] == 1000


@pytest.mark.parametrize("query,words", [
    ([("score_threshold", "1.5")], r"score_threshold='1.5' is not a number from 0 to 1"),
    ([("score_threshold", "nan")], "score_threshold='nan' is not a number"),
    ([("score_threshold", "high")], "score_threshold='high'"),
    ([("max_instances", "0")], r"max_instances='0' is not an integer from 1 to 1000"),
    ([("max_instances", "1001")], "max_instances='1001'"),
    ([("max_instances", "2.5")], "max_instances='2.5' is not an integer"),
    ([("max_instances", "1_0")], "max_instances='1_0'"),
    ([("max_instances", "3"), ("max_instances", "3")], "'max_instances' given more than once"),
    ([("top_k", "3")], "unknown query parameter 'top_k'; accepted: format, alpha, score_threshold, "
                       "max_instances"),
])
def test_task_query_options_refused_with_400_naming_them(query, words):
    with pytest.raises(api.ApiError, match=words) as err:
        api.parse_options(query, ANSWERS, task_options=TASK_OPTIONS)
    assert err.value.status == 400


def test_a_task_without_query_options_refuses_instance_ones():
    refused = "unknown query parameter 'score_threshold'; accepted: format, alpha$"
    with pytest.raises(api.ApiError, match=refused):
        api.parse_options([("score_threshold", "0.5")], ANSWERS)


def test_declared_length_checked_before_reading():
    api.check_length(None, 10)
    api.check_length("10", 10)
    with pytest.raises(api.ApiError, match="11 bytes") as err:
        api.check_length("11", 10)
    assert err.value.status == 413
    with pytest.raises(api.ApiError, match="not a number"):
        api.check_length("ten", 10)


def test_multipart_parts_binary_safe():
    data = bytes(range(256)) * 3 + b"\r\n--notTheBoundary\r\n"
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b0undary--\r\n")
    assert api.image_bytes(body, "multipart/form-data; boundary=b0undary") == (data, "image/png")
    raw = b"\x89PNG..."
    assert api.image_bytes(raw, "image/png") == (raw, "image/png")


def test_mask_summary_rle_round_trip():
    from pycocotools import mask as rle

    mask = np.zeros((7, 9), np.uint8)
    mask[2:5, 3:8] = 2
    summary = mask_summary(mask, CLASSES, [(0, 0, 0), (1, 1, 1), (2, 2, 2)])
    assert (summary["width"], summary["height"]) == (9, 7)
    background, road, car = summary["classes"]
    assert (background["pixels"], road["pixels"], car["pixels"]) == (48, 0, 15)
    assert road["rle"] is None and car["fraction"] == pytest.approx(15 / 63)
    decoded = rle.decode({"size": car["rle"]["size"], "counts": car["rle"]["counts"].encode()})
    np.testing.assert_array_equal(decoded, (mask == 2).astype(np.uint8))
    json.dumps(summary)


def test_batch_of_mixed_sizes_matches_one_at_a_time(fitted):
    model, _ = fitted
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
              [(33, 47, 3), (48, 64, 3), (33, 47, 3), (90, 120, 3), (5, 3, 3)]]
    for predictor in (Predictor(model, tile_above_pixels=4096, tile_size=(32, 48)),
                      Predictor(model, flip_tta=True)):
        batch = predictor.masks(images)
        for image, mask in zip(images, batch, strict=True):
            alone = predictor.mask(image)
            assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
            assert (mask != alone).mean() < 1e-3


def test_service_answers_in_process(fitted):
    model, _ = fitted
    service = Service(model, ModelRef(uri="models:/m/1", name="m", version="1"),
                      ServeParams.defaults(max_pixels=2000))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="PNG")
    reply = service.handle_predict(buf.getvalue(), "image/png", [("format", "json")])
    assert reply.status == 200 and json.loads(reply.body)["model"]["version"] == "1"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(buf, format="PNG")
    reply = service.handle_predict(buf.getvalue(), "image/png")
    assert reply.status == 413 and "pixels" in json.loads(reply.body)["error"]
    meta = service.metadata()
    assert meta["classes"] == CLASSES and meta["model"]["uri"] == "models:/m/1"
    assert meta["task"] == "semantic" and meta["answers"] == ANSWERS     # the model's task answers
    assert list(meta["query_options"]) == ["refine"]        # its own query option: a refinement
    assert meta["query_options"]["refine"] | {"description": ""} == {
        "type": "string", "enum": ["none", "crf", "grabcut"], "default": None, "description": ""}
    reply = service.handle_predict(buf.getvalue(), "image/png", [("max_instances", "3")])
    assert reply.status == 400 and "max_instances" in json.loads(reply.body)["error"]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_refine_asks_for_a_refinement_per_request_with_serves_parameters(fitted):
    from pipeline.inference.refine import dense_crf

    model, _ = fitted
    cfg = ServeParams.defaults(max_pixels=4000, tile_above_pixels=2000)
    service = Service(model, ModelRef(uri="models:/m/1", name="m", version="1"), cfg)
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    refined = service.handle_predict(png_bytes(image), "image/png", [("refine", "crf")])
    assert refined.status == 200
    probs = Predictor(model, tile_above_pixels=2000).probs(image).numpy()
    expected = dense_crf(image, probs, **cfg.crf.model_dump()).argmax(0)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(refined.body))), expected)
    plain = service.handle_predict(png_bytes(image), "image/png", [("refine", "none")])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(plain.body))),
                                  Predictor(model).mask(image))
    for query, status, words in (
            ([("refine", "grabcut")], 400, r"refine=grabcut: .*grabcut refines a binary mask \(2 classes\); "
                                           "this model has 3"),
            ([("refine", "blur")], 400, "refine='blur' is not one of none, crf, grabcut")):
        reply = service.handle_predict(png_bytes(image), "image/png", query)
        assert reply.status == status and re.search(words, json.loads(reply.body)["error"]), reply.body
    large = np.zeros((50, 60, 3), np.uint8)                 # 3,000 pixels: above tile_above_pixels
    reply = service.handle_predict(png_bytes(large), "image/png", [("refine", "crf")])
    error = json.loads(reply.body)["error"]
    assert reply.status == 413 and "refines images of at most 2,000 pixels whole" in error
    assert service.handle_predict(png_bytes(large), "image/png").status == 200      # no refinement: tiles


def test_serve_can_refine_every_request_and_refine_none_turns_it_off(fitted):
    model, _ = fitted
    service = Service(model, ModelRef(uri="models:/m/1", name="m", version="1"),
                      ServeParams.defaults(postprocess="crf"))
    assert service.predictor.postprocess.method == "crf" and service.metadata()["inference"]["postprocess"]
    assert service.predictor_for("none").postprocess is None
    assert service.predictor_for("crf") is service.predictor


def test_the_refine_option_offers_what_each_task_can_take():
    from pipeline.tasks.instance import InstanceTask
    from pipeline.tasks.panoptic import PanopticTask

    with pytest.raises(api.ApiError, match="refine='crf' is not one of none, grabcut") as err:
        api.parse_options([("refine", "crf")], InstanceTask.answers, task_options=InstanceTask.query_options)
    assert err.value.status == 400
    assert api.parse_options([("refine", "grabcut")], InstanceTask.answers,
                             task_options=InstanceTask.query_options).task_options["refine"] == "grabcut"
    assert "refine" not in PanopticTask.query_options
    with pytest.raises(api.ApiError, match="unknown query parameter 'refine'") as err:
        api.parse_options([("refine", "crf")], PanopticTask.answers, task_options=PanopticTask.query_options)
    assert err.value.status == 400


def test_resolve_model(fitted, env):
    model, cfg = fitted
    uri = f"sqlite:///{env / 'mlflow.db'}"
    assert registered_model(env / "m1", model, cfg, "net", test_score=0.5) == "1"
    assert registered_model(env / "m2", model, cfg, "net", alias="challenger", test_score=0.6) == "2"
    champion = resolve_model("champion", "net", uri)
    assert (champion.uri, champion.version, champion.alias) == ("models:/net/1", "1", "champion")
    assert champion.evaluation == {"score_metric": "miou", "test_score": 0.5, "eval_key": "0123456789ab",
                                    "split_version": None}
    assert resolve_model("2", "net", uri).uri == "models:/net/2"
    assert resolve_model("models:/net@challenger", "other", uri).version == "2"
    assert resolve_model("models:/net/1", "other", uri).version == "1"
    runs = resolve_model(f"runs:/{champion.run_id}/model", "net", uri)
    assert runs.run_id == champion.run_id and runs.evaluation is None     # a run is no registered version
    with pytest.raises(LookupError, match=r"no version '7'.*versions 1, 2"):
        resolve_model("7", "net", uri)
    with pytest.raises(LookupError, match="no alias 'gold'"):
        resolve_model("gold", "net", uri)
    with pytest.raises(LookupError, match="no versions"):
        resolve_model("champion", "missing", uri)


def test_replica_reports_a_model_that_fails_to_load(env):
    """/health says 503 "failed" with the reason, /predict answers 503, and Serve's health
    check raises so that the replica is replaced."""
    import asyncio

    import ray

    from pipeline.serve import Segmenter

    replica = Segmenter.func_or_class(ModelRef(uri="models:/missing/1").to_dict(),
                                      ServeParams.defaults().model_dump(mode="json"),
                                      f"sqlite:///{env / 'mlflow.db'}")
    assert replica.loaded.wait(60)
    reply = replica._health()
    assert reply.status == 503 and json.loads(reply.body)["status"] == "failed"
    assert "missing" in json.loads(reply.body)["error"]
    with pytest.raises(RuntimeError, match="failed to load"):
        replica.check_health()
    with pytest.raises(api.ApiError, match="not loaded") as err:
        asyncio.run(replica._ready())
    assert err.value.status == 503
    assert not ray.is_initialized(), "constructing the replica class outside Serve started Ray"


def test_metadata_shows_the_versions_recorded_score_after_a_later_evaluation(coded, fitted, env):
    """/metadata reports what the register stage recorded for the version (its test mIoU and
    evaluation key), not the scores of whatever evaluation of the run came last."""
    import yaml

    from pipeline.config.params import parse_section
    from pipeline.evaluate import evaluate
    from pipeline.register import register

    model, cfg = fitted
    tracked_model(env / "model", model, cfg)
    small = {"scales": [1.0], "overlays": {"samples": 0, "worst_per_class": 0}}
    params = repo_params(env / "params.yaml", evaluate=small | {"flip_tta": True},
                         register={"model_name": "meta-unet", "onnx": False})
    first = evaluate(env / "model", coded, env / "evaluation", env / "metrics.json", env / "plots", params)
    register(env / "model", env / "evaluation" / "evaluate.json", coded, env / "registry.json", params)
    # Evaluated again with other settings (a new record on the same run), not registered.
    later = repo_params(env / "later.yaml", evaluate=small | {"flip_tta": False, "scales": [0.5]})
    second = evaluate(env / "model", coded, env / "later", env / "later.json", env / "later-plots", later)
    assert second["eval_key"] != first["eval_key"]
    assert second["miou"] != pytest.approx(first["miou"], abs=1e-6)

    ref = resolve_model("champion", "meta-unet", f"sqlite:///{env / 'mlflow.db'}")
    serve = parse_section(ServeParams, yaml.safe_load(params.read_text())["serve"] | {"threads": 1})
    shown = Service(model, ref, serve).metadata()["model"]["evaluation"]
    assert shown["eval_key"] == first["eval_key"]
    assert (shown["score_metric"], shown["test_score"]) == ("miou", pytest.approx(first["miou"], abs=1e-6))
    assert shown["metrics"]["miou"] == pytest.approx(first["miou"])
    assert shown["metrics"]["mean_dice"] == pytest.approx(first["mean_dice"])
    assert shown["settings"]["flip_tta"] is True and shown["split_version"] == first["split_version"]
    json.dumps(shown)                                              # the /metadata answer is JSON


@pytest.mark.parametrize("arch, encoder", [("ENet", None), ("PointRend", "resnet18"),
                                           ("GatedSCNN", "resnet18")])
def test_a_seed_family_model_is_served_like_any(arch, encoder):
    """The classic architectures (issue 19) through the service: JSON, PNG and a tiled image."""
    cfg = ModelParams.model_validate({"family": "seed", "arch": arch, "encoder_name": encoder,
                                      "encoder_weights": None, "in_channels": 3, "classes": None,
                                      "kwargs": {}})
    meta = ModelMeta(class_names=CLASSES, palette=[(0, 0, 0), (128, 64, 128), (64, 0, 128)])
    torch.manual_seed(0)
    model = build_model(cfg, len(CLASSES), meta).eval()
    service = Service(model, ModelRef(uri="models:/m/1", name="m", version="1"),
                      ServeParams.defaults(tile_above_pixels=1500, tile_size=[32, 32]))
    buf = io.BytesIO()
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(image).save(buf, format="PNG")
    reply = service.handle_predict(buf.getvalue(), "image/png", [("format", "json")])
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["width"] == 53
    reply = service.handle_predict(buf.getvalue(), "image/png", [("format", "png")])
    assert reply.status == 200 and Image.open(io.BytesIO(reply.body)).size == (53, 37)
