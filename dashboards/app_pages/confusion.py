"""The confusion matrix of an evaluation record's split, row-normalised, with counts on hover."""

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from dashboards import data, ui

src = ui.sources()
st.title("Confusion matrix")
run_id, eval_key = ui.pick_record(src, key="confusion-run")
names, counts = ui.confusion(src, run_id, eval_key)
share = data.row_normalised(counts)
fig = go.Figure(go.Heatmap(
    z=[[None if np.isnan(v) else float(v) for v in row] for row in share], x=names, y=names,
    customdata=counts.tolist(), colorscale="Blues", zmin=0, zmax=1,
    colorbar=dict(title="share of row", tickformat=".0%"),
    hovertemplate=("truth %{y}<br>predicted %{x}<br>%{z:.1%} of the row<br>%{customdata:,} pixels"
                   "<extra></extra>"),
))
fig.update_layout(height=160 + 42 * len(names), xaxis_title="predicted", yaxis_title="truth",
                  yaxis_autorange="reversed", margin=dict(l=10, r=10, t=10, b=10))
st.plotly_chart(fig, key="confusion-heatmap")
diag = np.diag(share)
worst = int(np.nanargmin(np.where(np.isnan(diag), np.inf, diag)))
row = share[worst].copy()
row[worst] = -1
confused = names[int(np.nanargmax(row))]
st.caption(f"Rows sum to 100 %: each shows where the pixels of one true class went. Hardest class: "
           f"**{names[worst]}** ({diag[worst]:.1%} right), most often taken for {confused}.")
