"""Rendering shared by the pages: answers, sources, tool traces and the one-line API error.

Everything from the model or from documents goes through ``sanitize_markdown``
(or ``st.text``); nothing is rendered with ``unsafe_allow_html``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import streamlit as st

from ui.client import ApiClient, ApiError
from ui.sanitize import sanitize_markdown
from ui.settings import UiSettings

_SNIPPET_CHARS = 300
_TOOL_TEXT_CHARS = 2000


def get_client() -> ApiClient:
    """A client for this run (settings re-read, so a changed environment is seen)."""
    return ApiClient(UiSettings())


def fail_page(error: ApiError) -> NoReturn:
    """Show the API error in one line with a retry button, and stop this run of the page."""
    st.error(error.message, icon=":material/cloud_off:")
    st.button("Retry", key="retry_api", icon=":material/refresh:")
    st.stop()


def show_error(error: ApiError) -> None:
    """Show an API error in one line (the page goes on)."""
    st.error(error.message, icon=":material/error:")


def source_label(citation: Mapping[str, Any]) -> str:
    """``[n] title · p. 3 · Section > Sub`` for a citation (untrusted text, not sanitized)."""
    title = str(citation.get("title") or citation.get("source") or citation.get("doc_id") or "?")
    parts = [title]
    if citation.get("page") is not None:
        parts.append(f"p. {citation['page']}")
    if citation.get("section") and str(citation["section"]) != title:
        parts.append(str(citation["section"]))
    number = citation.get("number", citation.get("n"))
    head = f"[{number}] " if number is not None else ""
    return head + " · ".join(parts)


def hit_as_source(hit: Mapping[str, Any]) -> dict[str, Any]:
    """A ``POST /api/search`` hit in the shape of a citation (numbered by rank)."""
    meta = hit.get("metadata") or {}
    return {
        "number": hit.get("rank"),
        "doc_id": hit.get("doc_id"),
        "source": meta.get("source"),
        "title": meta.get("title"),
        "page": meta.get("page"),
        "section": meta.get("section"),
        "snippet": hit.get("text"),
        "score": hit.get("score"),
    }


def render_citations(citations: Sequence[Mapping[str, Any]], *, cited: bool = True) -> None:
    """Sources: title, page/section, score, snippet and file name.

    Args:
        citations: Citations of the answer, or (``cited=False``) the retrieved
            chunks the model was given when its answer cites none of them.
        cited: Whether the answer cited these.
    """
    if not citations:
        return
    label = "Sources" if cited else "Retrieved sources (the answer cites none)"
    with st.expander(f"{label} ({len(citations)})", expanded=True, icon=":material/menu_book:"):
        for citation in citations:
            score = citation.get("score")
            score_text = f" — score {score:.3f}" if isinstance(score, int | float) else ""
            st.markdown(f"**{sanitize_markdown(source_label(citation))}**{score_text}")
            source = str(citation.get("source") or "")
            if source:
                st.caption(sanitize_markdown(source))
            snippet = str(citation.get("snippet") or "")
            if snippet:
                st.text(_clip(snippet, _SNIPPET_CHARS))


def render_tool_trace(tool_calls: Sequence[Mapping[str, Any]]) -> None:
    """The agent's tool calls and their results, collapsed."""
    if not tool_calls:
        return
    count = f"{len(tool_calls)} call" + ("s" if len(tool_calls) != 1 else "")
    with st.expander(f"Tool trace ({count})", icon=":material/build:"):
        for i, call in enumerate(tool_calls, 1):
            failed = " (failed)" if call.get("error") else ""
            st.markdown(f"**{i}. {sanitize_markdown(str(call.get('name', '?')))}**{failed}")
            arguments = call.get("arguments")
            st.code(json.dumps(arguments, ensure_ascii=False, indent=1), language="json")
            result = call.get("result")
            if result is not None:
                st.text(_clip(str(result), _TOOL_TEXT_CHARS))


def render_message(message: Mapping[str, Any]) -> None:
    """One stored chat turn (user or assistant) with its sources and trace."""
    role = "user" if message.get("role") == "user" else "assistant"
    with st.chat_message(role):
        st.markdown(sanitize_markdown(str(message.get("content") or "")))
        if role == "assistant":
            render_tool_trace(message.get("tool_calls") or [])
            render_citations(message.get("citations") or [])
            render_citations(message.get("retrieved") or [], cited=False)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
