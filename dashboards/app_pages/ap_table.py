"""Average precision of an instance evaluation record: COCO mask and box AP (overall, AP50,
AP75, by object size, per class) and the precision-recall curves."""

import plotly.graph_objects as go
import streamlit as st

from dashboards import data, ui

# One dash per IoU threshold of the curve (PR_IOUS); 0.50:0.95 is the AP's own average.
PR_STYLE = {"0.50": ("#1f77b4", "solid"), "0.75": ("#ff7f0e", "dash"), "0.50:0.95": ("#2ca02c", "dot")}
SCORE = ui.SCORE_COLUMN

src = ui.sources()
task = ui.task(src)
st.title("Average precision")
run_id, eval_key = ui.pick_record(src, key="ap-run", metric=task.primary_metric)
report = ui.scores(src, run_id, eval_key)
cards = [k for k in task.headline_keys() if isinstance(report.get(k), float)]
for col, key in zip(st.columns(max(1, len(cards))), cards, strict=False):
    col.metric(data.score_label(task, key), f"{report[key]:.3f}")
counts = report.get("instances") or {}
st.caption(f"{report.get('images', '?')} images of split `{report.get('split', '?')}` · "
           f"{counts.get('truth', '?')} true instances, {counts.get('predicted', '?')} predicted · "
           "COCO AP (pycocotools' COCOeval); the DSB score is the Data Science Bowl 2018 metric "
           "(mean over IoU 0.50:0.95 of TP / (TP + FP + FN), per image, then over images).")

left, right = st.columns([2, 3])
with left:
    st.subheader("AP")
    st.dataframe(data.ap_table(report), hide_index=True, key="ap-table",
                 column_config={"mask": SCORE, "box": SCORE})
    st.caption("Empty cells: nothing to score (no true object of that size) or not computed "
               "(box AP by object size).")
    st.subheader("Per class")
    classes = data.class_ap_table(report, ui.class_colours(src, run_id, eval_key))
    st.dataframe(classes.drop(columns=["colour"]), hide_index=True, key="class-ap",
                 column_config={"mask AP": SCORE, "box AP": SCORE})
with right:
    st.subheader("Precision-recall (masks)")
    curves = data.pr_curves(report)
    fig = go.Figure()
    for iou, rows in curves.groupby("IoU", sort=False):
        colour, dash = PR_STYLE.get(iou, ("#555", "solid"))
        fig.add_trace(go.Scatter(x=rows["recall"].tolist(), y=rows["precision"].tolist(), mode="lines",
                                 name=f"IoU {iou}", line=dict(color=colour, dash=dash),
                                 hovertemplate=f"IoU {iou}<br>recall %{{x:.2f}}<br>precision %{{y:.3f}}"
                                               "<extra></extra>"))
    fig.update_layout(height=420, xaxis=dict(range=[0, 1], title="recall"),
                      yaxis=dict(range=[0, 1.02], title="precision"), legend_title_text="",
                      margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, key="pr-curve")
    st.caption("COCOeval's interpolated precision at 101 recall points, averaged over the classes "
               "with truth; past the highest recall the predictions reach, precision is 0. The mean "
               "of the IoU 0.50 curve over its points is AP50.")
