"""All MLflow runs; compare two or more: per-class scores of their evaluations (IoU, or mask AP
for instance runs) side by side and training curves."""

import plotly.express as px
import streamlit as st

from dashboards import data, ui

src = ui.sources()
task = ui.task(src)
st.title("Runs")
table = ui.runs(src)
if table.empty:
    ui.no_results(src)
labels = ui.versions(src)
names = [r.get("tags.mlflow.runName") or r["run_id"][:8] for _, r in table.iterrows()]
table = table.assign(label=[f"{n} {labels.get(i, '')}".strip()
                            for n, i in zip(names, table["run_id"], strict=True)])
# A run's score is its registered version's recorded one (of the shown task's metric: another
# task's score is another column); each evaluation is a record of its own.
counts = ui.evaluations(src)["run_id"].value_counts()
scores = ui.registered_scores(src)
metrics = sorted({m for m, _ in scores.values()} | {task.primary_metric},
                 key=lambda m: m != task.primary_metric)           # the shown task's first
registered = {f"registered test {data.score_label(task, m)}": [
    score[1] if (score := scores.get(i)) and score[0] == m else None for i in table["run_id"]]
    for m in metrics}
table = table.assign(**registered, evaluations=[int(counts.get(i, 0)) for i in table["run_id"]])
columns = ["label", "status", "start_time", *registered, "evaluations"] + [c for c in (
    f"metrics.best_val_{task.primary_metric}", "params.prepare.task", "params.model.family",
    "params.model.arch", "params.model.encoder_name", "params.train.epochs", "params.train.lr",
    "params.loss.terms") if c in table]
st.dataframe(table[columns], hide_index=True, key="runs-table")

chosen = st.multiselect("Compare runs", list(table["run_id"]), default=list(table["run_id"][:2]),
                        format_func=dict(zip(table["run_id"], table["label"], strict=True)).get,
                        key="compare")
if len(chosen) < 2:
    st.info("Pick two or more runs to compare them.")
    st.stop()
picked = table[table["run_id"].isin(chosen)]
names = dict(zip(picked["run_id"], picked["label"], strict=True))
score = (task.per_class_keys or ("iou",))[0]            # IoU for semantic, mask AP for instance
per_class = data.per_class_scores(picked, score)
if per_class.empty:
    per_class, source = data.val_per_class(picked, score), "last validation"
    per_class["run"] = per_class["run_id"].map(names)
else:
    source = "test evaluations"
    per_class["run"] = per_class["run_id"].map(names) + " · " + per_class["key"]       # one series per record
if not per_class.empty:
    label = data.per_class_label(task, score)
    fig = px.bar(per_class, x="class", y=score, color="run", barmode="group", labels={score: label},
                 title=f"Per-class {label} ({source})")
    fig.update_layout(yaxis_range=[0, 1], margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, key="compare-iou")
history = ui.curves(src, tuple(chosen), data.curve_keys(task))
if not history.empty:
    history["run"] = history["run_id"].map(names)
    fig = px.line(history, x="step", y="value", color="run", facet_col="metric", facet_col_wrap=2,
                  markers=True, title="Training curves (per epoch)")
    fig.update_yaxes(matches=None, showticklabels=True)
    fig.update_layout(height=560, margin=dict(l=10, r=10, t=60, b=10))
    st.plotly_chart(fig, key="compare-curves")
st.markdown("Open in the MLflow UI (`mlflow ui`, see README): " + " · ".join(
    f"[{names[r]}]({data.run_link(src, picked.set_index('run_id').loc[r, 'experiment_id'], r)})"
    for r in chosen))
