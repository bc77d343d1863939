"""Instance segmentation's answers to ``/predict`` and the query parameters they take.

Every answer holds the prediction's instances scoring at least ``score_threshold`` (default
0.5), the ``max_instances`` highest-scored of them (default: all), highest score first;
instance i below is the i-th of these.

- ``format=json`` (default): ``{"width", "height", "instances": [{"index", "class",
  "class_index", "score", "box": [x0, y0, x1, y1], "area", "mask": {"size": [h, w],
  "counts"}}]}``; ``mask`` is a COCO RLE (``pycocotools``' compressed counts, column-major),
  ``area`` its pixel count, ``box`` in pixels.
- ``format=png``: the instance-id image as a greyscale PNG: 0 = background, i + 1 =
  instance i; where instances overlap the higher score wins. 8-bit up to 255 instances,
  16-bit (PIL mode ``I;16``) above. The PNG's tEXt chunk ``instances`` holds, as JSON,
  ``[{"index", "class", "class_index", "score"}, ...]``: what each id is
  (``PIL.Image.open(...).text["instances"]``).
- ``format=overlay``: the image with each instance in its own colour (``alpha``: its
  opacity), outlined, labelled "class score", as JPEG (``pipeline.viz.instances.overlay``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.inference.instances import select
from pipeline.metrics.instance import DEFAULT_MIN_SCORE, Instances
from pipeline.tasks.base import JSON
from pipeline.tasks.options import INTEGER, NUMBER, REFINE, QueryOption
from pipeline.viz import instances as pictures
from pipeline.viz import overlays

ANSWERS = {"json": JSON, "png": "image/png", "overlay": "image/jpeg"}
SCORE_THRESHOLD, MAX_INSTANCES = "score_threshold", "max_instances"
QUERY_OPTIONS = {
    SCORE_THRESHOLD: QueryOption(NUMBER, 0.0, 1.0, DEFAULT_MIN_SCORE,
                                 "answer the instances scoring at least this"),
    MAX_INSTANCES: QueryOption(INTEGER, 1, 1000, None, "answer at most this many, the highest-scored "
                                                       "(default: all)"),
    REFINE: QueryOption.choice(("none", "grabcut"), "refine each instance's mask with the image by GrabCut; "
                                                    "default: the model's own"),
}
PNG_TEXT_KEY = "instances"
MAX_8BIT = 255
MAX_16BIT = 65535


def answer(options, image: np.ndarray, prediction: Instances, meta) -> tuple[Any, str]:
    """(body, media type) in ``options.format``: PNG or JPEG bytes, or a JSON-ready dict.
    ``options.task_options`` holds ``QUERY_OPTIONS``' values."""
    chosen = select(prediction, options.task_options.get(SCORE_THRESHOLD, 0.0),
                    options.task_options.get(MAX_INSTANCES))
    if options.format == "png":
        return id_png(chosen, meta.class_names), ANSWERS["png"]
    if options.format == "overlay":
        picture = pictures.overlay(image, chosen, meta.class_names, options.alpha)
        return overlays.jpeg(picture), ANSWERS["overlay"]
    return instance_summary(chosen, meta.class_names), JSON


def _class_name(names, index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def instance_summary(instances: Instances, names) -> dict[str, Any]:
    """The JSON answer (see the module doc) of instances in score order."""
    from pycocotools import mask as rle

    rows = []
    for i in range(len(instances)):
        mask = instances.masks[i]
        counts = mask["counts"] if isinstance(mask["counts"], str) else mask["counts"].decode("ascii")
        area = int(rle.area({"size": list(mask["size"]), "counts": counts.encode("ascii")}))
        rows.append({"index": i, "class": _class_name(names, instances.classes[i]),
                     "class_index": int(instances.classes[i]), "score": float(instances.scores[i]),
                     "box": [float(v) for v in instances.boxes[i]], "area": area,
                     "mask": {"size": [int(s) for s in mask["size"]], "counts": counts}})
    return {"width": instances.width, "height": instances.height, "instances": rows}


def id_png(instances: Instances, names) -> bytes:
    """The instance-id PNG with its ``instances`` tEXt chunk (see the module doc)."""
    n = len(instances)
    if n > MAX_16BIT:
        raise ValueError(f"{n} instances do not fit a 16-bit instance-id PNG (at most {MAX_16BIT})")
    ids = pictures.instance_ids(instances)
    picture = Image.fromarray(ids.astype(np.uint8 if n <= MAX_8BIT else np.uint16))   # mode L or I;16
    info = PngInfo()
    info.add_text(PNG_TEXT_KEY, json.dumps([
        {"index": i, "class": _class_name(names, instances.classes[i]),
         "class_index": int(instances.classes[i]), "score": float(instances.scores[i])}
        for i in range(n)]))                              # ASCII JSON (json.dumps' default): a tEXt chunk
    buf = io.BytesIO()
    picture.save(buf, format="PNG", pnginfo=info, compress_level=1)
    return buf.getvalue()
