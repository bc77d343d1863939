"""Streamlit pieces the pages share: sources, cached reads, the run picker, charts."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboards import data
from pipeline.tasks.base import Task

TTL_S = 30          # MLflow tables are re-read at most this often
# A record's files are cached under its run id and evaluation key, which fix them: a new
# evaluation is a new key, never a stale hit.
SCORE_COLUMN = st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.3f")   # a 0-1 score


def sources() -> data.Sources:
    return data.Sources.from_env()


@st.cache_data(ttl=TTL_S, show_spinner=False)
def champion(src: data.Sources) -> data.Champion | None:
    return data.champion(src)


def task(src: data.Sources) -> Task:
    """The task whose results are shown (``data.shown_task``)."""
    return data.shown_task(src, champion(src))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(src: data.Sources) -> pd.DataFrame:
    return data.runs(src)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def evaluations(src: data.Sources) -> pd.DataFrame:
    return data.evaluations(src)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def versions(src: data.Sources) -> dict[str, str]:
    return data.versions(src)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def registered_scores(src: data.Sources) -> dict[str, tuple[str, float]]:
    return data.registered_scores(src)


@st.cache_data(show_spinner="Reading the evaluation ...")
def scores(src: data.Sources, run_id: str, key: str) -> dict:
    return data.scores(src, run_id, key)


@st.cache_data(show_spinner="Reading the evaluation index ...")
def index(src: data.Sources, run_id: str, key: str) -> dict:
    return data.index(src, run_id, key)


@st.cache_data(show_spinner=False)
def confusion(src: data.Sources, run_id: str, key: str):
    return data.confusion(src, run_id, key)


@st.cache_data(show_spinner=False, max_entries=200)
def picture(src: data.Sources, run_id: str, key: str, relative: str):
    return data.picture(src, run_id, key, relative)


@st.cache_data(ttl=TTL_S, show_spinner=False, max_entries=50)
def prepared_image(src: data.Sources, split: str, image_id: str) -> tuple[bytes, str] | None:
    return data.prepared_image(src, split, image_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def curves(src: data.Sources, run_ids: tuple[str, ...], keys: tuple[str, ...]) -> pd.DataFrame:
    return data.curves(src, list(run_ids), keys)


def no_results(src: data.Sources) -> None:
    st.info(f"No evaluated run in the MLflow store `{src.tracking_uri}` yet. Run the pipeline "
            "(`make run`, i.e. `dvc repro`) and come back.")
    st.stop()


def pick_record(src: data.Sources, key: str, metric: str | None = None) -> tuple[str, str]:
    """A select box of the evaluation records (only those ranked by ``metric``, when given:
    the records of one task), the champion's recorded one first; returns (run id, evaluation key)."""
    table = evaluations(src)
    if metric is not None:
        table = table[table["metric"] == metric]
    if table.empty:
        no_results(src)
    labels = versions(src)
    champ = champion(src)
    ids = list(zip(table["run_id"], table["key"], strict=True))
    if champ is not None and (champ.run_id, champ.eval_key) in ids:
        ids.remove((champ.run_id, champ.eval_key))
        ids.insert(0, (champ.run_id, champ.eval_key))
    shown = task(src)
    names = {(row["run_id"], row["key"]): data.record_label(row, labels, shown)
             for _, row in table.iterrows()}
    return st.selectbox("Evaluation", ids, format_func=names.get, key=key)


def class_colours(src: data.Sources, run_id: str, key: str) -> dict[str, list[int]]:
    return {c["name"]: c["color"] for c in index(src, run_id, key)["classes"]}


def iou_bars(table: pd.DataFrame, value: str = "IoU") -> go.Figure:
    table = table.sort_values(value, ascending=True, na_position="first")
    # Lists, not Series: plotly would ship those as binary arrays, which a reader of the spec cannot compare.
    fig = go.Figure(go.Bar(x=table[value].tolist(), y=table["class"].tolist(), orientation="h",
                           marker_color=table["colour"].tolist(),
                           marker_line_color="#333", marker_line_width=0.5,
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(height=max(260, 28 * len(table) + 80), margin=dict(l=10, r=10, t=10, b=10),
                      xaxis=dict(range=[0, 1], title=value))
    return fig
