"""The Streamlit entry point: ``streamlit run ui/streamlit_app.py`` (or ``ragloom ui``).

Pages: Chat, Documents, Evaluation. They call the REST API over HTTP only
(``RAGLOOM_UI__API_URL``, ``RAGLOOM_UI__API_KEY``).
"""

from __future__ import annotations

import streamlit as st

from ui.views import chat, documents, evaluation

st.set_page_config(page_title="ragloom", page_icon=":material/forum:", layout="wide")

page = st.navigation(
    [
        st.Page(chat.render, title="Chat", icon=":material/chat:", url_path="chat", default=True),
        st.Page(
            documents.render, title="Documents", icon=":material/description:", url_path="documents"
        ),
        st.Page(
            evaluation.render,
            title="Evaluation",
            icon=":material/analytics:",
            url_path="evaluation",
        ),
    ]
)
page.run()
