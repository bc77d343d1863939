"""The results dashboard: ``streamlit run dashboards/app.py`` (see README, "Dashboard")."""

import streamlit as st

st.set_page_config(page_title="Segmentation results", page_icon=":material/layers:", layout="wide")
PAGES = [
    st.Page("pages/overview.py", title="Champion", icon=":material/emoji_events:", default=True),
    st.Page("pages/per_class.py", title="Per-class IoU", icon=":material/bar_chart:"),
    st.Page("pages/confusion.py", title="Confusion matrix", icon=":material/grid_on:"),
    st.Page("pages/overlays.py", title="Overlays", icon=":material/image:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/compare_arrows:"),
    st.Page("pages/try_it.py", title="Try it", icon=":material/upload:"),
]
st.navigation(PAGES).run()
