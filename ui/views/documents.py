"""The Documents page: collections, uploads followed to the end of their job, document lists."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import streamlit as st

from ui.client import ApiClient, ApiError
from ui.render import fail_page, get_client, show_error
from ui.sanitize import sanitize_markdown

logger = logging.getLogger(__name__)

_LAST_JOB = "docs_last_job"
_UPLOADER = "docs_uploader_round"
_ERROR = "docs_error"
_NOTICE = "docs_notice"
_POLL_S = 0.5
_FINAL = ("succeeded", "failed")


def follow_job(
    client: ApiClient,
    job_id: str,
    on_progress: Callable[[dict[str, Any]], None],
    *,
    timeout_s: float,
    poll_s: float = _POLL_S,
) -> dict[str, Any]:
    """Poll an ingestion job until it ends, reporting each state to ``on_progress``.

    Raises:
        ApiError: the API failed, or the job did not end within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.job(job_id)
        on_progress(job)
        if job.get("status") in _FINAL:
            return job
        if time.monotonic() > deadline:
            raise ApiError(
                f"The ingestion job {job_id} is still {job.get('status')} after {timeout_s:g} s; "
                "it goes on in the background, reload this page later.",
                code="job_timeout",
            )
        time.sleep(poll_s)


def job_summary(job: dict[str, Any]) -> tuple[str, list[str]]:
    """A one-line outcome of a job and one line per failed file, in words."""
    files = job.get("files") or []
    failed = [f for f in files if f.get("status") == "failed" or f.get("error")]
    chunks = int(job.get("chunks_added") or 0)
    done = len(files) - len(failed)
    if job.get("status") == "failed" and job.get("error"):
        head = f"Ingestion failed: {job['error']}"
    else:
        head = f"Indexed {done} of {len(files)} file(s), {chunks} new chunk(s)."
    problems = [f"{f.get('filename', '?')}: {f.get('error') or 'failed'}" for f in failed]
    return head, problems


def _progress_text(job: dict[str, Any]) -> tuple[float, str]:
    total = max(int(job.get("total_files") or 0), 1)
    processed = int(job.get("processed_files") or 0)
    text = f"{job.get('status', '?')}: {processed} of {total} file(s) processed"
    return min(processed / total, 1.0), text


def _create_collection(client: ApiClient) -> None:
    name = str(st.session_state.get("docs_new_name") or "").strip()
    if not name:
        st.session_state[_ERROR] = "Type a name for the new collection."
        return
    try:
        client.create_collection(name)
    except ApiError as exc:
        st.session_state[_ERROR] = exc.message
        return
    st.session_state["docs_collection"] = name
    st.session_state["docs_new_name"] = ""
    st.session_state[_NOTICE] = f"Created collection {name}."


def _delete_collection(client: ApiClient, name: str) -> None:
    try:
        client.delete_collection(name)
    except ApiError as exc:
        st.session_state[_ERROR] = exc.message
        return
    st.session_state.pop("docs_collection", None)
    st.session_state[_NOTICE] = f"Deleted collection {name}."


def _delete_document(client: ApiClient, collection: str, doc_id: str, title: str) -> None:
    try:
        client.delete_document(collection, doc_id)
    except ApiError as exc:
        st.session_state[_ERROR] = exc.message
        return
    st.session_state[_NOTICE] = f"Deleted {title}."


def _show_last_job() -> None:
    job = st.session_state.get(_LAST_JOB)
    if not job:
        return
    head, problems = job_summary(job)
    if job.get("status") == "failed" or problems:
        st.warning(sanitize_markdown(head), icon=":material/warning:")
    else:
        st.success(sanitize_markdown(head), icon=":material/check_circle:")
    for line in problems:
        st.text(line)


def _upload(client: ApiClient, collection: str) -> None:
    st.subheader("Add documents")
    round_ = st.session_state.setdefault(_UPLOADER, 0)
    files = st.file_uploader(
        "Files (PDF, DOCX, HTML, Markdown, text, CSV, JSONL)",
        accept_multiple_files=True,
        key=f"docs_files_{round_}",
    )
    if not st.button("Upload and index", type="primary", disabled=not files, key="docs_upload"):
        _show_last_job()
        return
    payload = [(f.name, f.getvalue(), f.type) for f in files or []]
    bar = st.progress(0.0, text=f"uploading {len(payload)} file(s)")

    def on_progress(job: dict[str, Any]) -> None:
        fraction, text = _progress_text(job)
        bar.progress(fraction, text=text)

    try:
        job_id = client.upload(collection, payload)
        job = follow_job(client, job_id, on_progress, timeout_s=client.settings.job_timeout_s)
    except ApiError as exc:
        show_error(exc)
        return
    st.session_state[_LAST_JOB] = job
    st.session_state[_UPLOADER] = round_ + 1
    st.rerun()


def _documents(client: ApiClient, collection: str) -> None:
    try:
        docs = client.documents(collection)
    except ApiError as exc:
        show_error(exc)
        return
    st.subheader(f"Documents ({len(docs)})")
    if not docs:
        st.caption("This collection has no documents yet.")
    for doc in docs:
        title = str(doc.get("title") or doc.get("source") or doc["doc_id"])
        left, right = st.columns([8, 1], vertical_alignment="center")
        with left:
            st.markdown(f"**{sanitize_markdown(title)}** — {int(doc.get('chunks') or 0)} chunk(s)")
            st.caption(sanitize_markdown(str(doc.get("source") or "")))
        right.button(
            "",
            key=f"docs_delete_{doc['doc_id']}",
            icon=":material/delete:",
            help="Delete this document",
            on_click=_delete_document,
            args=(client, collection, str(doc["doc_id"]), title),
        )


def render() -> None:
    """Draw the Documents page."""
    client = get_client()
    st.title("Documents")
    try:
        collections = client.collections()
    except ApiError as exc:
        fail_page(exc)
    error = st.session_state.pop(_ERROR, None)
    if error:
        st.error(error, icon=":material/error:")
    notice = st.session_state.pop(_NOTICE, None)
    if notice:
        st.toast(sanitize_markdown(notice))
    with (
        st.expander("New collection", expanded=not collections, icon=":material/add:"),
        st.form("docs_new_collection", border=False),
    ):
        st.text_input("Name", key="docs_new_name", placeholder="e.g. handbook")
        st.form_submit_button("Create collection", on_click=_create_collection, args=(client,))
    if not collections:
        st.info("No collections yet: create one to upload documents.")
        return
    names = [str(c["name"]) for c in collections]
    if st.session_state.get("docs_collection") not in names:
        st.session_state.pop("docs_collection", None)
    name = st.selectbox("Collection", names, key="docs_collection")
    record = next(c for c in collections if c["name"] == name)
    cols = st.columns(3)
    cols[0].metric("Documents", int(record.get("documents") or 0))
    cols[1].metric("Chunks", int(record.get("chunks") or 0))
    cols[2].caption(f"Embeddings: {sanitize_markdown(str(record.get('embedding_model', '?')))}")
    _upload(client, name)
    _documents(client, name)
    with st.expander("Delete this collection", icon=":material/delete_forever:"):
        confirm = st.checkbox(
            f"Yes, delete {name} and all its documents", key=f"docs_confirm_{name}"
        )
        st.button(
            "Delete collection",
            disabled=not confirm,
            on_click=_delete_collection,
            args=(client, name),
            key="docs_delete_collection",
        )
