"""The Chat page: streamed answers with their sources, tool traces, sessions in the sidebar."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from ui.client import ApiClient, ApiError, SseEvent
from ui.render import (
    fail_page,
    get_client,
    hit_as_source,
    render_citations,
    render_message,
    render_tool_trace,
    show_error,
)
from ui.sanitize import StreamSanitizer, sanitize_markdown

logger = logging.getLogger(__name__)

MODES = {"rag": "RAG (answers from documents)", "agent": "Agent (uses tools)", "llm": "LLM only"}
_MESSAGES = "chat_messages"
_SESSION = "chat_session_id"
_ERROR = "chat_error"
_MAX_SESSIONS_SHOWN = 30


@dataclass
class StreamedTurn:
    """Collects what a streamed answer carries besides its text.

    ``tokens()`` turns the API's events into sanitized text pieces for
    ``st.write_stream``; tool calls, citations and the final ``done`` data are
    kept here for rendering after the text.
    """

    events: Iterator[SseEvent]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None

    def tokens(self) -> Iterator[str]:
        """Sanitized text pieces of the answer, as they arrive."""
        sanitizer = StreamSanitizer()
        for event in self.events:
            data = event.data if isinstance(event.data, dict) else {}
            if event.event == "token":
                piece = sanitizer.feed(str(data.get("text", "")))
                if piece:
                    yield piece
            elif event.event == "tool_call":
                self.tool_calls.append(dict(data))
            elif event.event == "tool_result":
                self._attach_result(data)
            elif event.event == "citations":
                self.citations = list(data.get("citations") or [])
            elif event.event == "done":
                self.done = dict(data)
        rest = sanitizer.flush()
        if rest:
            yield rest

    def _attach_result(self, data: dict[str, Any]) -> None:
        for call in self.tool_calls:
            if call.get("id") == data.get("id"):
                call.update(result=data.get("result"), error=bool(data.get("error")))
                return
        self.tool_calls.append(dict(data))

    def message(self, streamed_text: str) -> dict[str, Any]:
        """The assistant turn as stored in the page's history."""
        done = self.done or {}
        return {
            "role": "assistant",
            "content": done.get("answer") or streamed_text,
            "citations": done.get("citations") or self.citations,
            "tool_calls": done.get("tool_calls") or self.tool_calls,
        }


def _new_chat() -> None:
    st.session_state[_MESSAGES] = []
    st.session_state[_SESSION] = None


def _open_session(client: ApiClient, session_id: str) -> None:
    try:
        detail = client.session(session_id)
    except ApiError as exc:
        st.session_state[_ERROR] = exc.message
        return
    st.session_state[_MESSAGES] = list(detail.get("messages") or [])
    st.session_state[_SESSION] = session_id
    if detail.get("mode") in MODES:
        st.session_state["chat_mode"] = detail["mode"]
    if detail.get("collection"):
        st.session_state["chat_collection"] = detail["collection"]


def _delete_session(client: ApiClient, session_id: str) -> None:
    try:
        client.delete_session(session_id)
    except ApiError as exc:
        st.session_state[_ERROR] = exc.message
        return
    if st.session_state.get(_SESSION) == session_id:
        _new_chat()


def _sidebar(
    client: ApiClient, collections: list[str], sessions: list[dict[str, Any]]
) -> dict[str, Any]:
    with st.sidebar:
        mode = st.radio("Mode", list(MODES), format_func=MODES.__getitem__, key="chat_mode")
        if st.session_state.get("chat_collection") not in collections:
            st.session_state.pop("chat_collection", None)
        collection = st.selectbox(
            "Collection",
            collections,
            key="chat_collection",
            placeholder="No collections: add documents first",
            disabled=mode == "llm" or not collections,
        )
        with st.expander("Sampling", icon=":material/tune:"):
            temperature = st.slider("Temperature", 0.0, 2.0, 0.2, 0.05, key="chat_temperature")
            max_tokens = st.number_input(
                "Max tokens", min_value=1, max_value=8192, value=256, step=32, key="chat_max_tokens"
            )
            k = st.number_input(
                "Sources to retrieve (k)", min_value=1, max_value=50, value=5, key="chat_k"
            )
        st.button("New chat", icon=":material/add:", on_click=_new_chat, use_container_width=True)
        st.subheader("Sessions")
        if not sessions:
            st.caption("No saved sessions yet.")
        for session in sessions[:_MAX_SESSIONS_SHOWN]:
            sid = str(session["id"])
            current = sid == st.session_state.get(_SESSION)
            left, right = st.columns([5, 1], vertical_alignment="center")
            left.button(
                sanitize_markdown(str(session.get("title") or sid))[:60],
                key=f"open_{sid}",
                type="primary" if current else "secondary",
                on_click=_open_session,
                args=(client, sid),
                use_container_width=True,
            )
            right.button(
                "",
                key=f"delete_{sid}",
                icon=":material/delete:",
                help="Delete this session",
                on_click=_delete_session,
                args=(client, sid),
            )
    return {
        "mode": mode,
        "collection": None if mode == "llm" else collection,
        "sampling": {"temperature": float(temperature), "max_tokens": int(max_tokens)},
        "k": int(k),
    }


def _retrieved(
    client: ApiClient,
    prompt: str,
    options: dict[str, Any],
    turn: StreamedTurn,
    message: dict[str, Any],
) -> list[dict[str, Any]]:
    """The chunks a RAG answer was given, when it cites none of them (small models often don't)."""
    done = turn.done or {}
    if options["mode"] != "rag" or not options["collection"] or message["citations"]:
        return []
    if done.get("refused"):
        return []
    try:
        hits = client.search(prompt, options["collection"], options["k"])
    except ApiError as exc:
        logger.warning("could not list the retrieved sources: %s", exc.message)
        return []
    return [hit_as_source(h) for h in hits]


def _answer(client: ApiClient, prompt: str, options: dict[str, Any]) -> None:
    st.session_state[_MESSAGES].append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(sanitize_markdown(prompt))
    with st.chat_message("assistant"):
        turn = StreamedTurn(
            client.chat_stream(
                prompt,
                mode=options["mode"],
                collection=options["collection"],
                session_id=st.session_state.get(_SESSION),
                sampling=options["sampling"],
                k=options["k"] if options["collection"] else None,
            )
        )
        try:
            written = st.write_stream(turn.tokens())
        except ApiError as exc:
            show_error(exc)
            return
        text = written if isinstance(written, str) else "".join(map(str, written))
        message = turn.message(text)
        if not text.strip() and message["content"]:
            st.markdown(sanitize_markdown(str(message["content"])))
        render_tool_trace(message["tool_calls"])
        render_citations(message["citations"])
        message["retrieved"] = _retrieved(client, prompt, options, turn, message)
        render_citations(message["retrieved"], cited=False)
    if turn.done and turn.done.get("session_id"):
        st.session_state[_SESSION] = turn.done["session_id"]
    st.session_state[_MESSAGES].append(message)
    st.rerun()  # redraw from the history, with the session now in the sidebar list


def render() -> None:
    """Draw the Chat page."""
    st.session_state.setdefault(_MESSAGES, [])
    st.session_state.setdefault(_SESSION, None)
    client = get_client()
    st.title("Chat")
    try:
        collections = [str(c["name"]) for c in client.collections()]
        sessions = client.sessions()
    except ApiError as exc:
        fail_page(exc)
    options = _sidebar(client, collections, sessions)
    error = st.session_state.pop(_ERROR, None)
    if error:
        st.error(error, icon=":material/error:")
    for message in st.session_state[_MESSAGES]:
        render_message(message)
    needs_collection = options["mode"] == "rag" and not options["collection"]
    if needs_collection:
        st.info(
            "RAG mode needs a collection: create one and upload documents on the Documents page."
        )
    prompt = st.chat_input("Ask a question", disabled=needs_collection)
    if prompt:
        _answer(client, prompt, options)
