"""Panoptic quality of a panoptic evaluation record: PQ, SQ and RQ of all classes, of the things
and of the stuff, per class with its matched and unmatched segments, and the mIoU of the
panoptic output's semantic view (``pipeline.tasks.panoptic_eval.report``)."""

import streamlit as st

from dashboards import data, ui

src = ui.sources()
task = ui.task(src)
st.title("Panoptic quality")
run_id, eval_key = ui.pick_record(src, key="pq-run", metric=task.primary_metric)
report = ui.scores(src, run_id, eval_key)
keys = task.headline_keys()
for col, key in zip(st.columns(len(keys)), keys, strict=True):
    value = report.get(key)
    col.metric(data.score_label(task, key), "—" if value is None else f"{value:.3f}")
counts = report.get("segments") or {}
accuracy = report.get("pixel_accuracy")
st.caption(f"{report.get('images', '?')} images of split `{report.get('split', '?')}` · "
           f"{counts.get('truth', '?')} true segments (crowd regions apart: {counts.get('crowd', 0)}), "
           f"{counts.get('predicted', '?')} predicted: {counts.get('tp', '?')} matched, "
           f"{counts.get('fp', '?')} predicted unmatched, {counts.get('fn', '?')} true unmatched · "
           "semantic-view pixel accuracy " + ("—" if accuracy is None else f"{accuracy:.3f}"))
st.caption("A predicted and a true segment of a class match when their IoU is above 0.5. Per class, "
           "SQ is the mean IoU of the matches, RQ = TP / (TP + FP/2 + FN/2) and PQ = SQ x RQ; the "
           "figures of all classes, things and stuff are means over the classes with a segment. The "
           "semantic view (each pixel's class) scores mIoU as a semantic model's does.")

classes = data.class_pq_table(report, ui.index(src, run_id, eval_key)["classes"])
scores = {k.upper(): ui.SCORE_COLUMN for k in data.PQ_COLUMNS}
left, right = st.columns([3, 2])
with left:
    st.subheader("PQ, SQ, RQ")
    st.dataframe(data.pq_table(report), hide_index=True, key="pq-table", column_config=scores)
with right:
    st.subheader("PQ per class")
    st.plotly_chart(ui.iou_bars(classes, value="PQ"), key="pq-bars")
st.subheader("Per class")
st.dataframe(classes.drop(columns=["colour"]), hide_index=True, key="class-pq",
             column_config=scores | {"IoU": ui.SCORE_COLUMN})
st.caption("Empty PQ, SQ and RQ: no true or predicted segment of the class on this split. IoU is "
           "the semantic view's; TP, FP and FN count segments.")
