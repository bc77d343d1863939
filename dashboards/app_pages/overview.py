"""The champion: which model, how good, trained on what, with which params."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboards import data, ui

src = ui.sources()
champ = ui.champion(src)
task = ui.task(src)
st.title("Champion")
if champ is None:
    st.info(f"No version of `{src.model_name}` holds the champion alias in `{src.tracking_uri}` yet. "
            "Run the pipeline (`make run`) and come back.")
    st.stop()

st.subheader(f"{champ.name} · version {champ.version} · @{champ.alias}")
# The version's recorded evaluation: the score the registry gate compared, and the task's
# other headline scores of the same record (not whichever evaluation of the run came last).
evaluation = champ.evaluation or {}
metric = evaluation.get("score_metric", task.primary_metric)
scores = {f"test {data.score_label(task, metric)}": evaluation.get("test_score")} | {
    data.score_label(task, key): evaluation.get("metrics", {}).get(key)
    for key in task.headline_keys() if key != metric}
for col, (label, value) in zip(st.columns(len(scores)), scores.items(), strict=True):
    col.metric(label, "—" if value is None else f"{value:.3f}")
if champ.evaluation is None:
    st.caption("This version has no recorded evaluation (tags `test_score`, `eval_key`): register it with "
               "the pipeline's register stage.")
else:
    settings = data.settings_label(evaluation.get("settings") or {}, task)
    st.caption(f"evaluation `{champ.eval_key}` ({settings}) · "
               f"test set `{evaluation.get('split_version') or '?'}`")
st.caption(f"task `{task.name}` · run `{champ.run_id}` · data `{champ.tags.get('data_version', '?')}` · "
           f"commit `{champ.tags.get('git_commit', '?')[:12]}` · best validation {task.primary_label} "
           f"{champ.run_metrics.get(f'best_val_{task.primary_metric}', float('nan')):.3f}")

card = data.card(src)
left, right = st.columns([2, 3])
with left:
    st.subheader("Dataset")
    if card is None:
        st.info("No prepared dataset card (data/prepared/card.json) in this workspace.")
    else:
        st.markdown(f"**{card['dataset']}** · {card['classes']['num_classes']} classes · "
                    f"ignore label {card['classes']['ignore_index']}")
        st.dataframe(pd.DataFrame([{"split": k, **v} for k, v in card["splits"].items()]), hide_index=True)
with right:
    if card is not None:
        # Semantic cards give each class's share of the training pixels; instance cards count
        # each class's objects per split, panoptic cards its segments.
        freq = card.get("train_statistics", {}).get("frequency", {})
        if freq:
            title, hover, ticks = "Class frequency (training pixels)", "%{x:.2%} of training pixels", ".0%"
        else:
            train = card.get("statistics", {}).get("train", {})
            counted = "instances" if "instances" in train else "segments"
            freq = train.get(counted, {})
            title = f"{counted.capitalize()} per class (training split)"
            hover, ticks = f"%{{x:,}} {counted}", ","
        colours = dict(zip(card["classes"]["names"], card["classes"]["palette"], strict=True))
        names = sorted(freq, key=freq.get)
        fig = go.Figure(go.Bar(x=[freq[n] for n in names], y=names, orientation="h",
                               marker_color=[data.rgb_hex(colours[n]) for n in names],
                               marker_line_color="#333", marker_line_width=0.5,
                               hovertemplate=f"%{{y}}: {hover}<extra></extra>"))
        fig.update_layout(title=title, height=360, xaxis_tickformat=ticks,
                          margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(fig, key="class-frequency")

st.subheader("Params that trained it")
params = pd.DataFrame(sorted(champ.params.items()), columns=["param", "value"])
st.dataframe(params, hide_index=True, height=min(600, 36 * len(params) + 40))
