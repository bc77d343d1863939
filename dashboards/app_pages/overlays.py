"""Test images with truth, prediction and errors: opacity, class toggles, worst images per class.
Instance and panoptic evaluations' records hold drawn panels instead (``dashboards.panels``)."""

import numpy as np
import streamlit as st

from dashboards import data, panels, ui
from pipeline.viz import overlays

src = ui.sources()
st.title("Overlays")
run_id, eval_key = ui.pick_record(src, key="overlays-run")
index = ui.index(src, run_id, eval_key)
if data.panel_images(index):
    panels.show(src, run_id, eval_key, index)
    st.stop()
names = [c["name"] for c in index["classes"]]
palette = [c["color"] for c in index["classes"]]
by_id = {im["id"]: im for im in index["images"] if "image" in im.get("files", {})}
if not by_id:
    st.info("This evaluation kept no pictures (evaluate.overlays.samples and worst_per_class are 0).")
    st.stop()

left, right = st.columns([1, 3])
with left:
    browse = st.radio("Images", ["samples", "worst for a class"], key="browse")
    if browse == "samples":
        ids = [i for i in index["samples"] if i in by_id]
    else:
        cls = st.selectbox("Class", [n for n in names if index["worst"].get(n)], key="worst-class")
        ids = [i for i in index["worst"][cls] if i in by_id]
    image_id = st.selectbox("Image", ids, key="image-id")
    view = st.radio("View", ["prediction", "truth", "errors", "image"], key="view")
    alpha = st.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key="alpha")
    shown = st.multiselect("Classes shown", names, default=names, key="classes-shown")

entry = by_id[image_id]
image = ui.picture(src, run_id, eval_key, entry["files"]["image"])
if view == "image":
    picture = image
elif view == "errors":
    picture = overlays.blend(image, ui.picture(src, run_id, eval_key, entry["files"]["error"]), alpha)
else:
    mask = ui.picture(src, run_id, eval_key, entry["files"][view])
    colours = overlays.colorize(mask, palette)
    keep = np.isin(mask, [names.index(n) for n in shown])
    blended = overlays.blend(image, colours, alpha)
    picture = np.where(keep[..., None], blended, image)
with right:
    st.image(picture, caption=f"{image_id} · {view}", width="stretch")
    extra = [("wrong", overlays.WRONG_RGB), ("ignored", overlays.IGNORED_RGB)] if view == "errors" else []
    st.image(overlays.legend(names, palette, 900, extra=extra), width="stretch")
    scores = {k: v for k, v in entry.get("iou", {}).items() if v is not None}
    if scores:
        st.caption("IoU on this image: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(scores.items(),
                                                                                  key=lambda kv: kv[1])))
