"""An evaluation's drawn panels (the overlays page for a record whose index holds panels).

The evaluate stage drew each chosen test image as one panel, image | truth | prediction:
for instance segmentation every instance in its own colour with its class and score
(``pipeline.tasks.instance_eval``), for panoptic segmentation stuff in its class colour and
each thing in its own shade, outlined (``pipeline.tasks.panoptic_eval``). The index gives each
image's scores (``data.PANEL_SCORES``: DSB score and mask AP50, or PQ) and its true and
predicted counts. Nothing is blended here: the panels are shown as drawn.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboards import data, ui

SAMPLES = "samples"


def _score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def image_table(entries: list[dict[str, Any]], scores: data.PanelScores) -> pd.DataFrame:
    """One row per image: id, its scores (None: nothing to score), true and predicted counts."""
    named = ((scores.key, scores.label), *scores.others)
    columns = ["image", *(label for _, label in named), "true", "predicted"]
    return pd.DataFrame([{"image": e["id"], **{label: e.get(key) for key, label in named},
                          "true": e.get("truth"), "predicted": e.get("predicted")} for e in entries],
                        columns=columns)


def show(src: data.Sources, run_id: str, eval_key: str, index: dict[str, Any]) -> None:
    """The samples or the worst images of a record, one panel at a time, with its scores."""
    by_id = data.panel_images(index)
    scores = data.panel_scores(list(by_id.values()))
    worst = f"worst by {scores.label}"
    left, right = st.columns([1, 3])
    with left:
        browse = st.radio("Images", [SAMPLES, worst], key="browse",
                          help=f"worst: the test images with the lowest {scores.label}, lowest first")
        ids = [i for i in index["samples" if browse == SAMPLES else "worst"] if i in by_id]
        if not ids:
            st.info(f"This evaluation kept no {browse} (evaluate.overlays).")
            return
        image_id = st.selectbox("Image", ids, key="image-id", format_func=lambda i: (
            f"{i} · {scores.short} {_score(by_id[i].get(scores.key))}"))
    entry = by_id[image_id]
    with right:
        st.image(ui.picture(src, run_id, eval_key, entry["files"]["panel"]), width="stretch",
                 caption=f"{image_id} · image | truth | prediction")
        others = "".join(f" · {label} {_score(entry.get(key))}" for key, label in scores.others)
        counts = f"{entry.get('truth', '?')} true {scores.counted}, {entry.get('predicted', '?')} predicted"
        st.caption(f"{scores.label} **{_score(entry.get(scores.key))}**{others} · {counts}")
    formats = {label: st.column_config.NumberColumn(format="%.3f")
               for label in (scores.label, *(label for _, label in scores.others))}
    st.dataframe(image_table([by_id[i] for i in ids], scores), hide_index=True, key="panel-table",
                 column_config=formats)
