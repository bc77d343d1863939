"""Send an image to the running model server and show what it sees."""

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboards import data, ui
from pipeline.serving.client import ServerError, Unreachable, content_type, get_json, post_image
from pipeline.tasks.base import JSON


def formats(meta: dict | None) -> tuple[str | None, str | None]:
    """The server's answer formats (its model's task's, from /metadata) this page shows: a
    picture (the overlay where offered) and JSON; None where the server offers none."""
    answers = (meta or {}).get("answers", {})
    pictures = [f for f, media in answers.items() if media.startswith("image/")]
    picture = "overlay" if "overlay" in pictures else next(iter(pictures), None)
    return picture, next((f for f, media in answers.items() if media == JSON), None)


def query_controls(meta: dict | None) -> dict:
    """An input for each of the task's own query parameters (/metadata's ``query_options``,
    e.g. instance segmentation's score threshold, semantic segmentation's refinement); the
    values set (None: left out)."""
    chosen = {}
    for name, spec in (meta or {}).get("query_options", {}).items():
        label, helps, key = name.replace("_", " "), spec.get("description"), f"option-{name}"
        if spec["type"] == "string":                       # a choice: the server's default first
            value = st.selectbox(label, [None, *spec["enum"]], key=key, help=helps,
                                 format_func=lambda v: "model's own" if v is None else v)
            if value is not None:
                chosen[name] = value
            continue
        low, high, default = spec["minimum"], spec["maximum"], spec["default"]
        if spec["type"] == "integer":
            value = st.number_input(label, int(low), int(high), default, step=1, key=key, help=helps)
        else:
            value = st.slider(label, float(low), float(high), float(low if default is None else default),
                              key=key, help=helps)
        if value is not None:
            chosen[name] = value
    return chosen


def box_text(box: list[float]) -> str:
    """x0, y0, x1, y1 in whole pixels."""
    return ", ".join(f"{v:.0f}" for v in box)


def instance_table(instances: list[dict]) -> pd.DataFrame:
    """One row per instance of an instance answer (its RLE left out)."""
    return pd.DataFrame([{"#": i["index"], "class": i["class"], "score": round(i["score"], 3),
                          "area (px)": i["area"], "box": box_text(i["box"])}
                         for i in instances], columns=["#", "class", "score", "area (px)", "box"])


def segment_table(segments: list[dict]) -> pd.DataFrame:
    """One row per segment of a panoptic answer (``segments_info``, its RLE left out): stuff
    segments have no score."""
    columns = ["id", "class", "kind", "score", "area (px)", "box"]
    return pd.DataFrame([{"id": s["id"], "class": s["category"], "kind": "thing" if s["isthing"] else "stuff",
                          "score": round(s["score"], 3) if s.get("score") is not None else None,
                          "area (px)": s["area"], "box": box_text(s["box"])}
                         for s in segments], columns=columns)


def area_chart(classes: list[dict]) -> go.Figure:
    areas = pd.DataFrame([{"class": c["name"], "share": c["fraction"], "pixels": c["pixels"],
                           "colour": data.rgb_hex(c["color"])} for c in classes])
    areas = areas[areas["pixels"] > 0].sort_values("share")
    fig = go.Figure(go.Bar(x=areas["share"].tolist(), y=areas["class"].tolist(), orientation="h",
                           marker_color=areas["colour"].tolist(), customdata=areas["pixels"].tolist(),
                           hovertemplate="%{y}: %{x:.1%} (%{customdata:,} px)<extra></extra>"))
    fig.update_layout(title="Area per class", xaxis_tickformat=".0%", height=360,
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


src = ui.sources()
st.title("Try it")
url = st.text_input("Model server", src.serve_url, key="serve-url",
                    help=f"Start it with `make serve`; default from ${data.ENV_SERVE_URL}")
try:
    meta = get_json(url, "/metadata")
    st.caption(f"Serving {meta['model'].get('name') or meta['model']['uri']} version "
               f"{meta['model'].get('version') or '-'} on {meta['device']}")
except (Unreachable, ServerError) as exc:
    st.warning(f"The model server at {url} is not answering ({exc}). Start it with `make serve` "
               "(or `python -m pipeline.serve`) and try again.")
    meta = None

source = st.radio("Image", ["upload", "a test image"], horizontal=True, key="source")
payload = name = None
if source == "upload":
    upload = st.file_uploader("An image (PNG, JPEG, TIFF, BMP, WebP)", key="upload",
                              type=["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"])
    if upload is not None:
        payload, name = upload.getvalue(), upload.name
else:
    champ = ui.champion(src)
    if champ is None or champ.eval_key is None:
        st.info("No champion with a recorded evaluation yet, so no test images to pick from.")
    else:
        run_id, eval_key = champ.run_id, champ.eval_key
        index = ui.index(src, run_id, eval_key)
        kept = {im["id"]: im["files"]["image"] for im in index["images"] if "image" in im.get("files", {})}
        # An evaluation that kept no plain pictures (instance panels): the workspace's prepared split.
        ids = list(kept) or [im["id"] for im in index["images"]]
        picked = st.selectbox("Test image", ids, key="test-image")
        if picked in kept:
            path = data.eval_file(src, run_id, eval_key, kept[picked])
            payload, name = path.read_bytes(), path.name
        elif picked is not None:
            found = ui.prepared_image(src, index.get("split", "test"), picked)
            if found is None:
                st.info(f"The evaluation kept no picture of {picked} and the workspace's prepared data "
                        "does not hold it: upload an image instead.")
            else:
                payload, name = found

options = query_controls(meta)
if payload is not None and st.button("Segment", type="primary", key="segment"):
    picture_format, json_format = formats(meta)
    declared = content_type(Path(name))
    try:
        if meta is None:
            get_json(url, "/metadata")              # says why the server does not answer
        picture = picture_format and post_image(url, payload, declared, picture_format, options=options)
        summary = json_format and post_image(url, payload, declared, json_format, options=options)
    except Unreachable as exc:
        st.error(f"The model server does not answer: {exc}")
    except ServerError as exc:
        st.error(f"The server refused {name}: {exc.message}")
    else:
        answer = json.loads(summary.body) if summary else {}
        left, right = st.columns([3, 2])
        if picture:
            size = f" · {answer['width']}x{answer['height']}" if "width" in answer else ""
            left.image(picture.body, caption=f"{name}{size}", width="stretch")
        classes = answer.get("classes")
        if classes and all({"name", "fraction", "pixels", "color"} <= c.keys() for c in classes):
            right.plotly_chart(area_chart(answer["classes"]), key="areas")      # a class-area answer
        elif isinstance(answer.get("instances"), list):                          # an instance answer
            right.caption(f"{len(answer['instances'])} instances")
            right.dataframe(instance_table(answer["instances"]), hide_index=True, key="instances")
        elif isinstance(answer.get("segments_info"), list):                      # a panoptic answer
            segments = answer["segments_info"]
            things = sum(bool(s["isthing"]) for s in segments)
            right.caption(f"{len(segments)} segments: {things} things, {len(segments) - things} stuff")
            right.dataframe(segment_table(segments), hide_index=True, key="segments")
        elif answer:
            right.json(answer, expanded=1)
