"""The UI's HTTP client of the ragloom REST API (httpx), with a one-line error for every failure.

Every transport or HTTP failure becomes an ``ApiError`` whose message is one
sentence a person can act on ("cannot reach the API at ...", "the API refused
the key ..."), so pages show it with ``st.error`` instead of a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ui.settings import UiSettings

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A failed API call, with a message fit to show as it is.

    Attributes:
        message: One line saying what went wrong and, where possible, what to do.
        status: The HTTP status, or None when no response came back.
        code: The API's error code (``collection_not_found``, ...) or a local one
            (``unreachable``, ``timeout``).
    """

    def __init__(self, message: str, *, status: int | None = None, code: str = "api_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: its name and its JSON-decoded data."""

    event: str
    data: Any


def iter_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Parse server-sent events from text lines (comments and pings skipped).

    Args:
        lines: The response body split into lines (without line endings).

    Yields:
        Each event, its ``data`` decoded as JSON (kept as text when it is not JSON).
    """
    name, data = "message", list[str]()
    for line in lines:
        if not line.strip():
            if data:
                yield SseEvent(name, _decode("\n".join(data)))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield SseEvent(name, _decode("\n".join(data)))


def _decode(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    return str(message)


class ApiClient:
    """Calls the ragloom REST API for the UI pages.

    Args:
        settings: API URL, key and timeouts.

    Example:
        >>> client = ApiClient(UiSettings())
        >>> [c["name"] for c in client.collections()]
        >>> for event in client.chat_stream("What is the refund policy?", collection="faq"):
        ...     print(event.event, event.data)
    """

    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self.base_url = settings.api_url.rstrip("/")
        headers = {"Accept": "application/json"}
        if settings.api_key is not None and settings.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._headers = headers

    # -- plumbing ----------------------------------------------------------------

    def _client(self, read_timeout: float | None = None) -> httpx.Client:
        timeout = httpx.Timeout(
            self.settings.timeout_s,
            connect=min(5.0, self.settings.timeout_s),
            read=read_timeout or self.settings.timeout_s,
        )
        return httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout)

    def _fail(self, response: httpx.Response) -> ApiError:
        status = response.status_code
        detail = _error_message(response)
        code = "api_error"
        try:
            code = str(response.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            pass
        if status == 401:
            message = (
                f"The API refused the key (401: {detail}); set RAGLOOM_UI__API_KEY to a valid "
                "key (`ragloom keys create --tenant NAME`)."
            )
        elif status == 403:
            message = f"The API key may not do this (403: {detail})."
        elif status == 429:
            message = f"Too many requests (429: {detail}); wait a moment and try again."
        elif status >= 500:
            message = f"The API failed ({status}: {detail})."
        else:
            message = f"{detail} ({status})"
        return ApiError(message, status=status, code=code)

    def _transport_error(self, exc: httpx.HTTPError) -> ApiError:
        if isinstance(exc, httpx.TimeoutException):
            return ApiError(
                f"The API at {self.base_url} did not answer in time; it may be busy, try again.",
                code="timeout",
            )
        if isinstance(exc, httpx.ConnectError):
            return ApiError(
                f"Cannot reach the API at {self.base_url}: is `ragloom serve` running? "
                "(set RAGLOOM_UI__API_URL if it runs elsewhere)",
                code="unreachable",
            )
        return ApiError(f"The connection to the API at {self.base_url} failed: {exc}.")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with self._client() as client:
                response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            logger.warning("%s %s failed: %s", method, path, exc)
            raise self._transport_error(exc) from exc
        if response.is_error:
            logger.warning("%s %s -> %s", method, path, response.status_code)
            raise self._fail(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(f"The API sent a reply that is not JSON for {path}.") from exc

    # -- collections and documents -------------------------------------------------

    def collections(self) -> list[dict[str, Any]]:
        """The collections: ``name``, ``documents``, ``chunks``, ``embedding_model``."""
        return list(self._json("GET", "/api/collections")["data"])

    def create_collection(self, name: str) -> dict[str, Any]:
        """Create an empty collection."""
        return dict(self._json("POST", "/api/collections", json={"name": name}))

    def delete_collection(self, name: str) -> None:
        """Delete a collection and everything in it."""
        self._json("DELETE", f"/api/collections/{_segment(name)}")

    def documents(self, collection: str) -> list[dict[str, Any]]:
        """The collection's documents: ``doc_id``, ``source``, ``title``, ``chunks``."""
        data = self._json("GET", f"/api/collections/{_segment(collection)}/documents")
        return list(data["data"])

    def delete_document(self, collection: str, doc_id: str) -> None:
        """Remove one document from a collection."""
        path = f"/api/collections/{_segment(collection)}/documents/{_segment(doc_id)}"
        self._json("DELETE", path)

    def upload(self, collection: str, files: Sequence[tuple[str, bytes, str | None]]) -> str:
        """Upload files (name, content, MIME type) for ingestion; returns the job id."""
        if not files:
            raise ApiError("Choose at least one file to upload.", code="no_files")
        parts = [
            ("files", (name, data, mime or "application/octet-stream"))
            for name, data, mime in files
        ]
        job = self._json("POST", f"/api/collections/{_segment(collection)}/documents", files=parts)
        return str(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """An ingestion job: ``status``, ``processed_files``/``total_files``, per-file ``files``."""
        return dict(self._json("GET", f"/api/jobs/{_segment(job_id)}"))

    def search(self, query: str, collection: str, k: int = 5) -> list[dict[str, Any]]:
        """Retrieval only (``POST /api/search``): ranked chunks with ``text`` and ``metadata``."""
        body = {"query": query, "collection": collection, "k": k}
        return list(self._json("POST", "/api/search", json=body)["results"])

    # -- sessions ------------------------------------------------------------------

    def sessions(self) -> list[dict[str, Any]]:
        """Chat sessions, most recent first: ``id``, ``title``, ``collection``, ``mode``, ..."""
        return list(self._json("GET", "/api/sessions")["data"])

    def session(self, session_id: str) -> dict[str, Any]:
        """A session with its ``messages`` (role, content, citations, tool_calls)."""
        return dict(self._json("GET", f"/api/sessions/{_segment(session_id)}"))

    def delete_session(self, session_id: str) -> None:
        """Delete a session and its history."""
        self._json("DELETE", f"/api/sessions/{_segment(session_id)}")

    # -- chat ----------------------------------------------------------------------

    def chat_stream(
        self,
        message: str,
        *,
        mode: str = "rag",
        collection: str | None = None,
        session_id: str | None = None,
        sampling: dict[str, Any] | None = None,
        k: int | None = None,
    ) -> Iterator[SseEvent]:
        """Ask a question and yield the answer's SSE events as they arrive.

        Events: ``token`` ``{"text"}``, ``tool_call``, ``tool_result``,
        ``citations`` ``{"citations"}``, ``done`` (the full answer, with
        ``session_id``) and ``error`` ``{"error": {...}}``. An ``error`` event is
        raised as ``ApiError`` after the events before it.
        """
        body: dict[str, Any] = {"message": message, "mode": mode, "stream": True}
        if collection:
            body["collection"] = collection
        if session_id:
            body["session_id"] = session_id
        if k is not None:
            body["k"] = k
        if sampling:
            body["sampling"] = {k: v for k, v in sampling.items() if v is not None}
        headers = {"Accept": "text/event-stream"}
        try:
            with (
                self._client(read_timeout=self.settings.chat_timeout_s) as client,
                client.stream("POST", "/api/chat", json=body, headers=headers) as response,
            ):
                if response.is_error:
                    response.read()
                    raise self._fail(response)
                for event in iter_sse(response.iter_lines()):
                    if event.event == "error":
                        raise ApiError(_event_error(event.data), code="stream_error")
                    yield event
        except httpx.HTTPError as exc:
            logger.warning("chat stream failed: %s", exc)
            raise self._transport_error(exc) from exc

    # -- evaluation ----------------------------------------------------------------

    def eval_runs(self) -> list[dict[str, Any]] | None:
        """Retrieval eval runs, or None while the API has no eval routes (404)."""
        try:
            data = self._json("GET", "/api/eval/runs")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        if isinstance(data, dict):
            data = data.get("data", [])
        return list(data or [])

    def eval_run(self, run_id: str) -> dict[str, Any]:
        """One run: ``status``, ``progress``, ``metrics`` {config: {metric: value}},
        ``report`` (Markdown), ``plots`` {name: API path of a PNG}, ``error``."""
        return dict(self._json("GET", f"/api/eval/runs/{_segment(run_id)}"))

    def start_eval_run(
        self, dataset: str, split: str, configs: dict[str, str], max_queries: int | None = None
    ) -> dict[str, Any]:
        """Start a retrieval evaluation of ``configs`` ({name: "mode[,key=value]"})."""
        body: dict[str, Any] = {"dataset": dataset, "split": split, "configs": configs}
        if max_queries:
            body["max_queries"] = max_queries
        return dict(self._json("POST", "/api/eval/runs", json=body))

    def plot(self, path: str) -> bytes:
        """A run's PNG plot, by the API path the run lists (only API paths are fetched)."""
        if not path.startswith("/api/eval/runs/"):
            raise ApiError(f"Refusing to fetch a plot outside the API: {path!r}.")
        response = self._request("GET", path, headers={"Accept": "image/png"})
        if not response.headers.get("content-type", "").startswith("image/png"):
            raise ApiError(f"The plot {path} is not a PNG image.")
        return response.content


def _segment(value: str) -> str:
    """``value`` quoted for one URL path segment."""
    from urllib.parse import quote

    return quote(value, safe="")


def _event_error(data: Any) -> str:
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return f"The answer failed: {error['message']}"
    return f"The answer failed: {data}"
