"""The served model's HTTP API as plain functions: request parts in, ``Reply`` out.

``pipeline.serve`` (Ray Serve) only moves bytes between HTTP and these functions, so
everything here is tested and benchmarked without a server.

``POST /predict`` takes the image as the raw body (with its Content-Type) or as the
multipart/form-data field ``image``; the query picks one of the model's task's answers
(``Task.answers``; the first is the default). For semantic segmentation
(``pipeline.tasks.semantic_answers``):

- ``format=png`` (default): the class-index mask as a palette PNG (pixel value = class);
- ``format=json``: image size, model, and per class the pixel count, fraction and a COCO
  RLE of its pixels (``pycocotools``' compressed counts, column-major);
- ``format=overlay``: the image blended with the coloured mask, as JPEG (``alpha`` sets
  the mask's opacity).

Beside ``format`` and ``alpha``, a task may take query parameters of its own
(``Task.query_options``, e.g. instance segmentation's ``score_threshold`` and
``max_instances``), checked here like the others and listed by ``/metadata``.

Every refusal is an ``ApiError`` with a 4xx status and a message that says what was wrong
and what is accepted; ``error_reply`` turns it into a JSON body ``{"error", "status"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.data.images import media_type
from pipeline.tasks.base import JSON, Task
from pipeline.tasks.options import QueryOption

QUERY_KEYS = ("format", "alpha")
IMAGE_FIELD = "image"
MULTIPART = "multipart/form-data"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(payload: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(payload, allow_nan=False).encode(), JSON)


def error_reply(status: int, message: str) -> Reply:
    return json_reply({"error": message, "status": status}, status)


@dataclass(frozen=True)
class Options:
    """What one /predict request asks for: ``task_options`` holds every one of the task's
    ``query_options``, the query's value or the default."""

    format: str = "png"
    alpha: float = 0.5
    task_options: Mapping[str, Any] = field(default_factory=dict)


def parse_options(query: Iterable[tuple[str, str]], answers: dict[str, str], default_alpha: float = 0.5,
                  task_options: Mapping[str, QueryOption] | None = None) -> Options:
    """The query string's (key, value) pairs -> ``Options``; unknown or repeated keys are errors.
    ``answers``: the formats the model's task gives (the first is the default);
    ``task_options``: the task's own query parameters (``Task.query_options``)."""
    task_options = task_options or {}
    accepted = QUERY_KEYS + tuple(task_options)
    seen: dict[str, str] = {}
    for key, value in query:
        if key not in accepted:
            raise ApiError(400, f"unknown query parameter {key!r}; accepted: {', '.join(accepted)}")
        if key in seen:
            raise ApiError(400, f"query parameter {key!r} given more than once")
        seen[key] = value
    answer = seen.get("format", next(iter(answers))).lower()
    if answer not in answers:
        raise ApiError(400, f"format={seen['format']!r} is not one of {', '.join(answers)}")
    alpha = default_alpha
    if "alpha" in seen:
        try:
            alpha = float(seen["alpha"])
        except ValueError:
            alpha = float("nan")
        if not 0.0 <= alpha <= 1.0:
            raise ApiError(400, f"alpha={seen['alpha']!r} is not a number between 0 and 1")
    values = {}
    for name, spec in task_options.items():
        try:
            values[name] = spec.parse(name, seen[name]) if name in seen else spec.default
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
    return Options(answer, alpha, values)


def check_length(content_length: str | None, max_bytes: int) -> None:
    """Refuse a declared body size before reading the body."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise ApiError(400, f"Content-Length {content_length!r} is not a number of bytes") from None
    if length > max_bytes:
        raise ApiError(413, f"body of {length:,} bytes is larger than the limit of {max_bytes:,}")


def image_bytes(body: bytes, content_type: str | None) -> tuple[bytes, str | None]:
    """The image bytes and their declared type, from a raw body or a multipart form."""
    if media_type(content_type) != MULTIPART:
        return body, content_type
    parts = multipart_parts(body, content_type or "")
    images = [p for p in parts if p[0] == IMAGE_FIELD]
    if not images:
        names = sorted({p[0] for p in parts}) or ["none"]
        raise ApiError(400, f"multipart form has no field {IMAGE_FIELD!r} (fields: {', '.join(names)})")
    if len(images) > 1:
        raise ApiError(400, f"multipart form has {len(images)} {IMAGE_FIELD!r} fields; send one image "
                            "per request")
    _, part_type, data = images[0]
    return data, part_type


def multipart_parts(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(field name, declared content type, bytes) of each part of a multipart/form-data body."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary in its Content-Type")
    parts: list[dict[str, Any]] = []
    header: list[bytes] = [b"", b""]
    ended = []

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header[0].decode("latin-1").lower()] = header[1].decode("latin-1")
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_end": lambda: ended.append(True),
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart/form-data body: {exc}") from None
    if not ended:
        raise ApiError(400, "malformed multipart/form-data body: no closing boundary")
    out = []
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        out.append((name, part["headers"].get("content-type"), b"".join(part["data"])))
    return out


def render(options: Options, image: np.ndarray, prediction: Any, task: Task, meta,
           model: dict[str, Any]) -> Reply:
    """The answer to one prediction, in the format ``options`` asks for (the task's ``answer``)."""
    body, media_type = task.answer(options, image, prediction, meta)
    if media_type == JSON:
        return json_reply(body | {"model": model})
    return Reply(200, body, media_type)
