"""An instance evaluation's pictures (the overlays page for a record whose index holds panels).

The evaluate stage drew each chosen test image as one panel, image | truth | prediction,
every instance in its own colour with its class and score (``pipeline.tasks.instance_eval``);
the index gives each image's DSB score, mask AP50 and instance counts. Nothing is blended
here: the panels are shown as drawn.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboards import data, ui

SAMPLES, WORST = "samples", "worst by DSB score"


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def image_table(entries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per image: id, DSB score, mask AP50 (None: no truth), true and predicted counts."""
    return pd.DataFrame([{"image": e["id"], "DSB score": e.get("dsb_score"), "mask AP50": e.get("mask_ap50"),
                          "true": e.get("truth"), "predicted": e.get("predicted")} for e in entries],
                        columns=["image", "DSB score", "mask AP50", "true", "predicted"])


def show(src: data.Sources, run_id: str, eval_key: str, index: dict[str, Any]) -> None:
    """The samples or the worst images of a record, one panel at a time, with its scores."""
    by_id = data.panel_images(index)
    left, right = st.columns([1, 3])
    with left:
        browse = st.radio("Images", [SAMPLES, WORST], key="browse",
                          help="worst: the test images with the lowest DSB score, lowest first")
        ids = [i for i in index["samples" if browse == SAMPLES else "worst"] if i in by_id]
        if not ids:
            st.info(f"This evaluation kept no {browse} (evaluate.overlays).")
            return
        image_id = st.selectbox("Image", ids, key="image-id",
                                format_func=lambda i: f"{i} · DSB {_score(by_id[i].get('dsb_score'))}")
    entry = by_id[image_id]
    with right:
        st.image(ui.picture(src, run_id, eval_key, entry["files"]["panel"]), width="stretch",
                 caption=f"{image_id} · image | truth | prediction")
        st.caption(f"DSB score **{_score(entry.get('dsb_score'))}** · "
                   f"mask AP50 {_score(entry.get('mask_ap50'))} · {entry.get('truth', '?')} true instances, "
                   f"{entry.get('predicted', '?')} predicted")
    scores = {k: st.column_config.NumberColumn(format="%.3f") for k in ("DSB score", "mask AP50")}
    st.dataframe(image_table([by_id[i] for i in ids]), hide_index=True, key="panel-table",
                 column_config=scores)
