"""The RAG answerer and the agent on the real SmolLM2-135M through our engine.

Twice: in-process (``LocalEngineBackend``), and over HTTP to the engine server
on 127.0.0.1 (a subprocess of ``ragloom engine serve``) with
``OpenAICompatBackend``. The tiny model's wording is not asserted; the
structure is: an answer streams back, every citation maps to a source that was
given, and with ``tool_choice="required"`` the first step is a call of an
allowed tool whose arguments pass the tool's schema.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agents import (
    AgentProfile,
    RagAnswerer,
    RagConfig,
    TokenEvent,
    ToolAgent,
    ToolCallEvent,
    ToolResultEvent,
    default_registry,
)
from llm_backend import ChatBackendModel, LocalEngineBackend, OpenAICompatBackend, SamplingOptions
from tests.agents.collection import open_retriever

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "smollm2-135m"


def _model_path() -> Path:
    from app.settings import get_settings
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.registry import resolve_model

    try:
        return resolve_model(MODEL, get_settings().models_dir)
    except EngineError as exc:
        pytest.skip(f"{MODEL} is not available here ({exc}); run `ragloom models pull {MODEL}`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def engine_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``ragloom engine serve`` starting on a free loopback port, stopped after the module.

    Requested before the collection fixture, so the model loads while the
    collection is being built; ``engine_url`` then waits until it answers.
    fp32 weights: they load fastest, and the agents layer does not care.
    """
    path = _model_path()
    port = _free_port()
    ragloom = Path(sys.executable).with_name("ragloom")
    command = [str(ragloom), "engine", "serve", "--model", str(path), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-batch", "2", "--max-seq-len", "2048"]
    command += ["--served-model-name", MODEL, "--quant", "fp32"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def engine_url(
    engine_server: tuple[subprocess.Popen[bytes], str], helpcentre_data_dir: Path
) -> str:
    """The server's URL once it answers ``/v1/models``."""
    server, url = engine_server
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            err = server.stderr.read().decode() if server.stderr else ""
            pytest.fail(f"engine server exited with {server.returncode}: {err[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("engine server did not answer within 120 s")
        time.sleep(0.5)


async def test_rag_answer_over_http_with_valid_citation_mapping(
    engine_server: object, helpcentre_data_dir: Path, engine_url: str
) -> None:
    backend = OpenAICompatBackend(engine_url, MODEL, context_window=2048)
    answerer = RagAnswerer(
        open_retriever(helpcentre_data_dir, k=3), backend, RagConfig(k=3, max_answer_tokens=48)
    )
    events = [e async for e in answerer.stream("How many days do new customers have to cancel?")]
    result = events[-1].answer

    assert not result.refused
    tokens = [e.text for e in events if isinstance(e, TokenEvent)]
    assert tokens and "".join(tokens) == result.answer and result.answer.strip()
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 48
    assert result.timings.ttft_ms is not None
    given = {s.number: s for s in result.sources}
    assert len(given) == 3
    for citation in result.citations:  # the tiny model may cite nothing; never a wrong source
        assert citation.number in given
        assert citation.doc_id == given[citation.number].doc_id
        assert citation.source.endswith(".md")
    assert not set(result.unknown_citations) & set(given)


async def test_agent_makes_a_valid_tool_call_over_http(
    engine_server: object, helpcentre_data_dir: Path, engine_url: str
) -> None:
    backend = OpenAICompatBackend(engine_url, MODEL, context_window=2048)
    registry = default_registry(open_retriever(helpcentre_data_dir, k=2))
    allowed = ["knowledge_base_search", "calculator"]
    profile = AgentProfile("support", tools=allowed, require_tool_first=True, max_steps=2)
    model = ChatBackendModel(backend=backend, sampling=SamplingOptions(max_tokens=48, seed=7))
    events = [e async for e in ToolAgent(model, registry, profile).stream("What is 6 times 7?")]

    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    results = {e.id: e for e in events if isinstance(e, ToolResultEvent)}
    assert calls, "tool_choice=required must produce a tool call"
    first = calls[0]
    assert first.name in allowed
    registry.get(first.name).tool_call_schema.model_validate(first.arguments)  # type: ignore[union-attr]
    assert first.id in results  # it ran (or failed cleanly) and the result was streamed
    result = events[-1].answer
    assert result.tool_calls[0].name == first.name and result.steps <= 2


@pytest.fixture(scope="module")
def local_backend() -> Iterator[LocalEngineBackend]:
    """Our engine in this process on the real model (fp32 loads fastest), stopped after."""
    backend = LocalEngineBackend.from_model_path(
        _model_path(), model_name=MODEL, quant="fp32", max_batch=1, max_seq_len=2048
    )
    try:
        yield backend
    finally:
        backend.close()


async def test_rag_answer_in_process(
    local_backend: LocalEngineBackend, helpcentre_data_dir: Path
) -> None:
    answerer = RagAnswerer(
        open_retriever(helpcentre_data_dir, k=3),
        local_backend,
        RagConfig(k=3, max_answer_tokens=40),
    )
    result = await answerer.answer("What does the router status light mean?")
    assert not result.refused and result.answer.strip()
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 40
    given = {s.number: s.doc_id for s in result.sources}
    assert all(given.get(c.number) == c.doc_id for c in result.citations)


async def test_agent_tool_call_in_process(
    local_backend: LocalEngineBackend, helpcentre_data_dir: Path
) -> None:
    registry = default_registry(open_retriever(helpcentre_data_dir, k=2))
    profile = AgentProfile(
        "support", tools=["knowledge_base_search"], require_tool_first=True, max_steps=2
    )
    model = ChatBackendModel(backend=local_backend, sampling=SamplingOptions(max_tokens=48, seed=3))
    result = await ToolAgent(model, registry, profile).run("How do I reset my router?")
    assert result.tool_calls, "tool_choice=required must produce a tool call"
    first = result.tool_calls[0]
    assert first.name == "knowledge_base_search" and not first.error
    assert isinstance(first.arguments.get("query"), str) and first.arguments["query"]
    assert first.result is not None and first.result.startswith("[1] ")
    assert result.sources and result.sources[0].number == 1


def test_cli_ask_json_over_http(
    engine_server: object,
    helpcentre_data_dir: Path,
    engine_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from app.cli import app
    from app.settings import get_settings

    monkeypatch.setenv("RAGLOOM_DATA_DIR", str(helpcentre_data_dir))
    monkeypatch.setenv("RAGLOOM_AGENT__MAX_ANSWER_TOKENS", "40")
    get_settings.cache_clear()
    try:
        question = ["ask", "How do I pay my bill?", "--collection", "helpcentre", "-k", "2"]
        backend = ["--backend", "openai", "--base-url", engine_url, "--model", MODEL]
        result = CliRunner().invoke(app, [*question, *backend, "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["answer"].strip() and body["refused"] is False
    assert len(body["sources"]) == 2 and body["tool_calls"] == []
    given = {s["number"]: s["doc_id"] for s in body["sources"]}
    assert all(given.get(c["number"]) == c["doc_id"] for c in body["citations"])
