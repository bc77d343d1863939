"""Instance segmentation's answers (pipeline.tasks.instance_answers) and its query parameters
through the service in-process: JSON with COCO RLE, the instance-id PNG (8- and 16-bit, with
its tEXt chunk), the overlay, score_threshold and max_instances."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as rle

from pipeline.config.params import ServeParams
from pipeline.metrics.instance import Instances, encode
from pipeline.models.base import ModelMeta
from pipeline.serving import api
from pipeline.serving.service import ModelRef, Service
from pipeline.tasks import instance_answers
from pipeline.tasks.instance import InstanceTask
from pipeline.tasks.instance_answers import ANSWERS, QUERY_OPTIONS
from tests.inference.test_instances import AWAY, CLASSES, MEAN, STD, BlobNet, draw

META = ModelMeta(CLASSES, mean=MEAN, std=STD, task=InstanceTask.name)


def options(fmt="json", alpha=0.5, **task):
    return api.parse_options([("format", fmt), *((k, str(v)) for k, v in task.items())], ANSWERS, alpha,
                             QUERY_OPTIONS)


def boxes(h, w, rects, scores, classes=None) -> Instances:
    masks = np.zeros((len(rects), h, w), bool)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = True
    return Instances(h, w, classes or [0] * len(rects), [list(map(float, r)) for r in rects], encode(masks),
                     scores)


def test_json_answer_lists_instances_in_score_order_with_coco_rle():
    pred = boxes(30, 40, [(1, 1, 5, 5), (10, 10, 30, 20), (2, 20, 8, 28)], [0.6, 0.95, 0.3], [0, 1, 0])
    body, media = instance_answers.answer(options(score_threshold=0.0), None, pred, META)
    assert media == "application/json" and (body["width"], body["height"]) == (40, 30)
    rows = body["instances"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["score"] for r in rows] == pytest.approx([0.95, 0.6, 0.3])
    assert [(r["class"], r["class_index"]) for r in rows] == [("red cell", 1), ("cell", 0), ("cell", 0)]
    assert rows[0]["box"] == [10.0, 10.0, 30.0, 20.0] and rows[0]["area"] == 200
    decoded = rle.decode({"size": rows[0]["mask"]["size"], "counts": rows[0]["mask"]["counts"].encode()})
    assert decoded.shape == (30, 40) and decoded[10:20, 10:30].all() and decoded.sum() == 200
    json.dumps(body)
    assert [r["score"] for r in instance_answers.answer(options(), None, pred, META)[0]["instances"]] == \
        pytest.approx([0.95, 0.6])                                   # default score_threshold 0.5
    limited = instance_answers.answer(options(score_threshold=0.0, max_instances=1), None, pred, META)[0]
    assert [r["score"] for r in limited["instances"]] == pytest.approx([0.95])


def test_png_answer_is_an_8_bit_instance_id_image_with_its_classes_in_a_text_chunk():
    pred = boxes(30, 40, [(0, 0, 20, 20), (10, 10, 30, 25)], [0.7, 0.9], [0, 1])
    body, media = instance_answers.answer(options("png"), None, pred, META)
    assert media == "image/png"
    picture = Image.open(io.BytesIO(body))
    ids = np.array(picture)
    assert picture.mode == "L" and ids.shape == (30, 40)
    assert ids[15, 15] == 1 and ids[5, 5] == 2 and ids[28, 38] == 0     # the higher score (index 0) wins
    assert json.loads(picture.text["instances"]) == [
        {"index": 0, "class": "red cell", "class_index": 1, "score": pytest.approx(0.9)},
        {"index": 1, "class": "cell", "class_index": 0, "score": pytest.approx(0.7)}]
    assert b"tEXtinstances" in body


def test_png_answer_is_16_bit_above_255_instances():
    rects = [(x, y, x + 2, y + 2) for y in range(0, 60, 3) for x in range(0, 45, 3)]       # 300
    pred = boxes(60, 45, rects, list(np.linspace(0.99, 0.6, len(rects))))
    body, _ = instance_answers.answer(options("png"), None, pred, META)
    picture = Image.open(io.BytesIO(body))
    ids = np.array(picture)
    assert picture.mode == "I;16" and ids.dtype == np.uint16 and ids.max() == 300
    assert ids[58, 43] == 300 and ids[0, 0] == 1 and len(json.loads(picture.text["instances"])) == 300
    few, _ = instance_answers.answer(options("png", max_instances=255), None, pred, META)
    assert Image.open(io.BytesIO(few)).mode == "L"


def test_every_answer_of_no_instances():
    image, none = draw(20, 30, []), Instances(20, 30)
    body, _ = instance_answers.answer(options(), image, none, META)
    assert body == {"width": 30, "height": 20, "instances": []}
    picture = Image.open(io.BytesIO(instance_answers.answer(options("png"), image, none, META)[0]))
    assert picture.mode == "L" and not np.array(picture).any() and json.loads(picture.text["instances"]) == []
    jpeg, _ = instance_answers.answer(options("overlay"), image, none, META)
    assert np.array(Image.open(io.BytesIO(jpeg))).shape == (20, 30, 3)


def test_overlay_answer_is_a_jpeg_of_the_image():
    image = draw(48, 64, [("circle", (20, 20, 8), 220, False)])
    pred = boxes(48, 64, [(12, 12, 29, 29)], [0.9])
    body, media = instance_answers.answer(options("overlay", alpha=0.6), image, pred, META)
    assert media == "image/jpeg"
    assert np.array(Image.open(io.BytesIO(body))).shape == (48, 64, 3)


def png_of(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def service():
    return Service(BlobNet(META), ModelRef(uri="models:/cells/1", name="cells", version="1"),
                   ServeParams.defaults(threads=1, tile_above_pixels=4096, tile_size=[64, 80]))


def test_the_service_answers_instances_and_applies_the_query_parameters(service):
    image = draw(200, 260, AWAY)                     # tiled: above 4096 pixels
    reply = service.handle_predict(png_of(image), "image/png", [("score_threshold", "0")])
    assert reply.status == 200 and reply.media_type == "application/json"
    body = json.loads(reply.body)
    assert body["model"]["version"] == "1" and len(body["instances"]) == len(AWAY)
    scores = [r["score"] for r in body["instances"]]
    assert scores == sorted(scores, reverse=True)
    above = json.loads(service.handle_predict(png_of(image), "image/png", [("score_threshold", "0.75")]).body)
    assert [r["score"] for r in above["instances"]] == [s for s in scores if s >= 0.75] and above["instances"]
    two = json.loads(service.handle_predict(png_of(image), "image/png", [("max_instances", "2"),
                                                                         ("score_threshold", "0")]).body)
    assert [r["score"] for r in two["instances"]] == scores[:2]
    png = service.handle_predict(png_of(image), "image/png", [("format", "png"), ("score_threshold", "0")])
    assert png.media_type == "image/png" and np.array(Image.open(io.BytesIO(png.body))).max() == len(AWAY)
    for query, words in [([("max_instances", "0")], "max_instances='0' is not an integer from 1 to 1000"),
                         ([("score_threshold", "2")], "score_threshold='2' is not a number from 0 to 1"),
                         ([("limit", "2")], "unknown query parameter 'limit'")]:
        refused = service.handle_predict(png_of(image), "image/png", query)
        assert refused.status == 400 and words in json.loads(refused.body)["error"]


def test_metadata_lists_the_instance_query_options(service):
    meta = service.metadata()
    assert meta["task"] == InstanceTask.name and meta["answers"] == ANSWERS
    assert meta["query_options"] == {
        "score_threshold": {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.5,
                            "description": QUERY_OPTIONS["score_threshold"].description},
        "max_instances": {"type": "integer", "minimum": 1, "maximum": 1000, "default": None,
                          "description": QUERY_OPTIONS["max_instances"].description},
        "refine": {"type": "string", "enum": ["none", "grabcut"], "default": None,
                   "description": QUERY_OPTIONS["refine"].description}}
    assert meta["inference"]["tile_size"] == (64, 80)
    json.dumps(meta)


def test_a_service_asked_for_flip_tta_on_an_instance_model_says_so():
    with pytest.raises(ValueError, match="flip_tta"):
        Service(BlobNet(META), ModelRef(uri="models:/cells/1"),
                ServeParams.defaults(threads=1, flip_tta=True))
