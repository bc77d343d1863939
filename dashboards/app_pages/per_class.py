"""Per-class scores of any evaluation record: a bar chart in the class colours and a table."""

import streamlit as st

from dashboards import data, ui

src = ui.sources()
st.title("Per-class IoU")
run_id, eval_key = ui.pick_record(src, key="per-class-run")
metrics = ui.scores(src, run_id, eval_key)
table = data.class_table(metrics, ui.class_colours(src, run_id, eval_key))
task = ui.task(src)
cards = [k for k in task.headline_keys() if isinstance(metrics.get(k), float)][:4]
for col, key in zip(st.columns(max(1, len(cards))), cards, strict=False):
    col.metric(data.score_label(task, key), f"{metrics[key]:.3f}")
st.plotly_chart(ui.iou_bars(table), key="iou-bars")
st.caption("Click a column header to sort. Empty cells: the class is absent from both truth and "
           "prediction on this split, so it has no score and is left out of the means. HD95 and ASD: the "
           "95th-percentile Hausdorff and average symmetric surface distances in pixels (lower is better), "
           "over the images with the class in both truth and prediction.")
st.dataframe(
    table.drop(columns=["colour"]), hide_index=True, key="class-table",
    column_config={k: st.column_config.ProgressColumn(k, min_value=0.0, max_value=1.0, format="%.3f")
                   for k in ("IoU", "Dice", "precision", "recall", "boundary IoU")}
    | {"pixel share": st.column_config.NumberColumn(format="percent")}
    | {k: st.column_config.NumberColumn(k, format="%.1f") for k in ("HD95 (px)", "ASD (px)")},
)
