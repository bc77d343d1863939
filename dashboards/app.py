"""The results dashboard: ``streamlit run dashboards/app.py`` (see README, "Dashboard").

The champion, runs and try-it pages serve every task; the evaluation pages between them
are the ones the shown task's outputs feed (``Task.views``, ``dashboards.data.view_pages``).
"""

import streamlit as st

from dashboards import data, ui

st.set_page_config(page_title="Segmentation results", page_icon=":material/layers:", layout="wide")
VIEWS = [st.Page(file, title=title, icon=icon)
         for file, title, icon in data.view_pages(ui.task(ui.sources()))]
PAGES = [
    st.Page("app_pages/overview.py", title="Champion", icon=":material/emoji_events:", default=True),
    *VIEWS,
    st.Page("app_pages/runs.py", title="Runs", icon=":material/compare_arrows:"),
    st.Page("app_pages/try_it.py", title="Try it", icon=":material/upload:"),
]
st.navigation(PAGES).run()
