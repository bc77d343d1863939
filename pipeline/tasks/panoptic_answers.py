"""Panoptic segmentation's answers to ``/predict``.

- ``format=png`` (default): the panoptic PNG in COCO's encoding: RGB, each pixel's segment
  id = R + 256 G + 256^2 B, 0 where no segment is (void). Its tEXt chunk ``segments_info``
  holds, as JSON, the segments without their masks (``{"id", "category", "category_id",
  "isthing", "iscrowd", "area", "bbox", "score"?}``): with it, the PNG is a COCO panoptic
  annotation a COCO panoptic reader takes as it is (``PIL.Image.open(...).text``).
- ``format=json``: ``{"width", "height", "segments_info": [...]}``, each segment as in the
  PNG plus ``box`` [x0, y0, x1, y1] and ``mask``, its COCO RLE (``pycocotools``'
  compressed counts, column-major). ``bbox`` is COCO's x, y, w, h.
- ``format=overlay``: the image with stuff in its class colour and each thing in its own
  shade of its class colour, outlined (``alpha``: the opacity), as JPEG.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.metrics.instance import encode
from pipeline.metrics.panoptic_types import Panoptic, ids_to_rgb
from pipeline.tasks.base import JSON
from pipeline.tasks.panoptic_eval import segments_info
from pipeline.viz import overlays
from pipeline.viz import panoptic as pictures

ANSWERS = {"png": "image/png", "json": JSON, "overlay": "image/jpeg"}
QUERY_OPTIONS: dict = {}
PNG_TEXT_KEY = "segments_info"


def isthing_of(meta) -> list[bool]:
    things = set(meta.thing_classes)
    return [c in things for c in range(len(meta.class_names))]


def answer(options, image: np.ndarray, prediction: Panoptic, meta) -> tuple[Any, str]:
    """(body, media type) in ``options.format``: PNG or JPEG bytes, or a JSON-ready dict."""
    isthing = isthing_of(meta)
    if options.format == "overlay":
        picture = pictures.overlay(image, prediction, meta.palette, isthing, options.alpha)
        return overlays.jpeg(picture), ANSWERS["overlay"]
    info = _named(segments_info(prediction, isthing), meta.class_names)
    if options.format == "png":
        return panoptic_png(prediction, info), ANSWERS["png"]
    masks = encode(np.stack([prediction.ids == s["id"] for s in info])) if info else []
    for s, mask in zip(info, masks, strict=True):
        x, y, w, h = s["bbox"]
        s["box"] = [x, y, x + w, y + h]
        s["mask"] = mask
    return {"width": prediction.width, "height": prediction.height, "segments_info": info}, JSON


def _named(info: list[dict], names) -> list[dict]:
    return [{"id": s["id"], "category": names[s["category_id"]], **{k: v for k, v in s.items() if k != "id"}}
            for s in info]


def panoptic_png(prediction: Panoptic, info: list[dict]) -> bytes:
    """The COCO panoptic PNG with its ``segments_info`` tEXt chunk (see the module doc)."""
    meta = PngInfo()
    meta.add_text(PNG_TEXT_KEY, json.dumps(info))     # ASCII JSON (json.dumps' default): a tEXt chunk
    buf = io.BytesIO()
    Image.fromarray(ids_to_rgb(prediction.ids), mode="RGB").save(buf, format="PNG", pnginfo=meta,
                                                                  compress_level=1)
    return buf.getvalue()
