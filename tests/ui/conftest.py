"""Fixtures of the UI tests: the real API app on loopback (scripted LLM, real Chroma and MiniLM).

The UI's only dependency is the REST API, so its tests talk to the real FastAPI
app (``app.main.create_app``) under uvicorn on 127.0.0.1. Only the LLM is
scripted, so answers are known; uploads, retrieval, citations, sessions and
auth are the real thing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.auth import create_key
from app.main import create_app
from app.settings import AgentSettings, ApiSettings, Settings
from llm_backend import ChatRequest, ChatResponse, ScriptedBackend, ToolCall, Usage
from tests.eval.beir_fixtures import write_beir

FACT = """# Zorblat festival

The Zorblat festival of Quillmere is held every year on the ninth of Brumaire.
Its mascot is a purple heron named Oskarine.
"""

ANSWER = (
    "The festival is on the ninth of Brumaire [1]. "
    "![pixel](http://tracker.invalid/p.png) <img src=http://tracker.invalid/q.png> done."
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(request: ChatRequest) -> ChatResponse:
    """Cites [1] when sources are in the prompt; one calculator call first in agent mode."""
    if request.tools and not any(m.role == "tool" for m in request.messages):
        return ChatResponse(
            "", [ToolCall("call_1", "calculator", '{"expression": "6*7"}')], "tool_calls"
        )
    if request.tools:
        return ChatResponse("The calculator says 42.", usage=Usage(10, 5))
    if "animal" in str(request.messages[-1].content):
        return ChatResponse("The mascot is a purple heron.", usage=Usage(10, 5))
    if "[1]" in str(request.messages):
        return ChatResponse(ANSWER, usage=Usage(10, 5))
    return ChatResponse("I know nothing about that.", usage=Usage(10, 5))


class Script(ScriptedBackend):
    """A scripted backend that never runs out: every call is ``_answer``."""

    def __init__(self) -> None:
        super().__init__([_answer], chunk_size=3)

    def _next(self, request: ChatRequest) -> ChatResponse:
        self._position = 0
        return super()._next(request)


def serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Start ``app`` under uvicorn on a free loopback port (in a thread)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ui-test-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@dataclass
class LiveApi:
    """A running API: its URL, a valid key (auth on) and a client with that key."""

    url: str
    key: str
    client: httpx.Client

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The real all-MiniLM-L6-v2, loaded once."""
    from retrieval import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    model.warm_up()
    return model


@pytest.fixture(scope="session")
def live_api(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> Iterator[LiveApi]:
    """The real API (auth on) with collection 'fest' holding the Zorblat document.

    Its eval datasets folder holds 'tiny', the BEIR fixture of the eval tests.
    """
    data_dir: Path = tmp_path_factory.mktemp("ui-api")
    write_beir(data_dir / "datasets" / "tiny")
    settings = Settings(
        data_dir=data_dir,
        agent=AgentSettings(min_score=0.0),
        api=ApiSettings(
            auth="on",
            rate_limit_per_minute=10_000,
            max_upload_mb=1,
            eval_datasets_dir=data_dir / "datasets",
        ),
    )
    app = create_app(settings, backend=Script(), embedder=embedder)
    _, key = create_key(app.state.ragloom.db, "acme")
    server, thread, url = serve(app)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            live = LiveApi(url, key, client)
            assert client.post(
                "/api/collections", json={"name": "fest"}, headers=live.headers
            ).is_success
            files = [("files", ("zorblat.md", FACT.encode(), "text/markdown"))]
            job = client.post(
                "/api/collections/fest/documents", files=files, headers=live.headers
            ).json()
            deadline = time.monotonic() + 120
            while job["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
                job = client.get(f"/api/jobs/{job['id']}", headers=live.headers).json()
            assert job["status"] == "succeeded", job
            yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch, live_api: LiveApi) -> LiveApi:
    """Point the UI (its settings read the environment) at the live API with a valid key."""
    monkeypatch.setenv("RAGLOOM_UI__API_URL", live_api.url)
    monkeypatch.setenv("RAGLOOM_UI__API_KEY", live_api.key)
    monkeypatch.setenv("RAGLOOM_UI__JOB_TIMEOUT_S", "120")
    return live_api


@pytest.fixture
def api_without_eval() -> Iterator[str]:
    """A loopback HTTP server answering 404 (in the API's error shape) to every request."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": {"message": "not found", "type": "not_found_error", "code": "nf"}}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        sock.close()
