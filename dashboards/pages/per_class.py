"""Per-class scores of any evaluation record: a bar chart in the class colours and a table."""

import streamlit as st

from dashboards import data, ui

src = ui.sources()
st.title("Per-class IoU")
run_id, eval_key = ui.pick_record(src, key="per-class-run")
metrics = ui.scores(src, run_id, eval_key)
table = data.class_table(metrics, ui.class_colours(src, run_id, eval_key))
c1, c2, c3 = st.columns(3)
c1.metric("mIoU", f"{metrics['miou']:.3f}")
c2.metric("mean Dice", f"{metrics['mean_dice']:.3f}")
c3.metric("pixel accuracy", f"{metrics['pixel_accuracy']:.3f}")
st.plotly_chart(ui.iou_bars(table), key="iou-bars")
st.caption("Click a column header to sort. Empty cells: the class is absent from both truth and "
           "prediction on this split, so it has no score and is left out of the means.")
st.dataframe(
    table.drop(columns=["colour"]), hide_index=True, key="class-table",
    column_config={k: st.column_config.ProgressColumn(k, min_value=0.0, max_value=1.0, format="%.3f")
                   for k in ("IoU", "Dice", "precision", "recall", "boundary IoU")}
    | {"pixel share": st.column_config.NumberColumn(format="percent")},
)
