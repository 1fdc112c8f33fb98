"""The Streamlit entry point: ``streamlit run ui/streamlit_app.py`` (or ``ragloom ui``).

Pages: Chat, Documents, Evaluation. They call the REST API over HTTP only
(``RAGLOOM_UI__API_URL``, ``RAGLOOM_UI__API_KEY``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# ``streamlit run`` puts this folder first on sys.path, where our module names
# (settings, client, render) would shadow top-level packages; the package is
# imported as ``ui`` instead (installed, or from the checkout this file is in).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.append(str(_HERE.parent))

from ui.views import chat, documents, evaluation  # noqa: E402

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
