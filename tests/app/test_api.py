"""The API on a scripted LLM backend with real Chroma, BM25 and MiniLM.

Covers the service layer end to end in-process (FastAPI's TestClient): the
auth matrix and tenant isolation, uploads -> job -> search -> chat with
citations, sessions and follow-ups, SSE event order, the OpenAI route's
shapes, limits and the one error shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.auth import create_key, hash_key
from app.main import create_app
from app.settings import ApiSettings, Settings
from llm_backend import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    SamplingOptions,
    ScriptedBackend,
    ToolCall,
    Usage,
)
from tests.app.conftest import FAQ, PETS, make_settings, parse_sse, wait_job


def _answer(request: ChatRequest) -> ChatResponse:
    """Answers citing source [1] when the prompt has sources; echoes otherwise."""
    last = request.messages[-1].content or ""
    if request.tools:
        return ChatResponse(
            "", [ToolCall("c1", "calculator", '{"expression": "6*7"}')], "tool_calls"
        )
    text = (
        "Refunds take 5 business days [1]." if "[1]" in str(request.messages) else f"echo: {last}"
    )
    return ChatResponse(text, usage=Usage(10, 5))


class Script(ScriptedBackend):
    """A scripted backend that never runs out: every call is ``_answer``."""

    def __init__(self) -> None:
        super().__init__([_answer], chunk_size=4)

    def _next(self, request: ChatRequest) -> ChatResponse:
        self._position = 0
        return super()._next(request)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("api")
    settings = make_settings(
        data_dir, max_message_chars=500, max_upload_mb=0.01, rate_limit_per_minute=1000
    )
    backend = Script()
    app = create_app(settings, backend=backend, embedder=embedder)
    state = app.state.ragloom
    _, key_a = create_key(state.db, "acme")
    _, key_b = create_key(state.db, "globex")
    with TestClient(app) as client:
        yield {
            "client": client,
            "a": {"Authorization": f"Bearer {key_a}"},
            "b": {"Authorization": f"Bearer {key_b}"},
            "backend": backend,
            "state": state,
            "data_dir": data_dir,
        }


@pytest.fixture(scope="module")
def faq(env: dict[str, Any]) -> dict[str, Any]:
    """Tenant acme's collection 'faq' with two uploaded files (one a path-traversal name)."""
    client, a = env["client"], env["a"]
    assert client.post("/api/collections", json={"name": "faq"}, headers=a).status_code == 201
    files = [
        ("files", ("../../etc/faq.md", FAQ.encode(), "text/markdown")),
        ("files", ("pets.md", PETS.encode(), "text/markdown")),
        ("files", ("bad.pdf", b"%PDF-1.4 not really a pdf", "application/pdf")),
    ]
    r = client.post("/api/collections/faq/documents", files=files, headers=a)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], a)
    return job


def test_health_needs_no_key_and_everything_else_does(env: dict[str, Any]) -> None:
    client = env["client"]
    assert client.get("/health").json() == {"status": "ok"}
    for method, path in [("GET", "/api/collections"), ("GET", "/ready"), ("GET", "/v1/models")]:
        r = client.request(method, path)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "missing_api_key"
    bad = {"Authorization": "Bearer rlk_000000000000_" + "x" * 40}
    r = client.get("/api/collections", headers=bad)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/api/collections", headers={"X-Api-Key": env["a"]["Authorization"][7:]})
    assert r.status_code == 401  # one header only


def test_keys_are_stored_hashed(env: dict[str, Any]) -> None:
    from sqlalchemy import select

    from app.db import ApiKey

    key = env["a"]["Authorization"][7:]
    with env["state"].db.session() as s:
        rows = s.scalars(select(ApiKey)).all()
        assert all(key not in (r.key_hash, r.id) for r in rows)
        assert hash_key(key) in {r.key_hash for r in rows}


def test_upload_job_reports_each_file_and_sanitizes_names(
    env: dict[str, Any], faq: dict[str, Any]
) -> None:
    assert faq["status"] == "succeeded"
    by_name = {f["filename"]: f for f in faq["files"]}
    assert set(by_name) == {"faq.md", "pets.md", "bad.pdf"}  # no folders kept
    assert by_name["faq.md"]["status"] == "added" and by_name["faq.md"]["chunks"] > 0
    assert by_name["bad.pdf"]["status"] == "failed" and by_name["bad.pdf"]["error"]
    assert str(env["data_dir"]) not in str(faq)  # server paths never leak
    docs = env["client"].get("/api/collections/faq/documents", headers=env["a"]).json()["data"]
    assert sorted(d["source"] for d in docs) == ["upload:faq.md", "upload:pets.md"]
    assert not any((env["data_dir"] / "uploads").rglob("*.md"))  # temp files removed


def test_tenants_are_isolated(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, b = env["client"], env["b"]
    assert client.get("/api/collections", headers=b).json() == {"data": []}
    names = [c["name"] for c in client.get("/api/collections", headers=env["a"]).json()["data"]]
    assert names == ["faq"]  # the physical t_acme__faq is never shown
    for method, path, body in [
        ("GET", "/api/collections/faq", None),
        ("GET", "/api/collections/faq/documents", None),
        ("DELETE", "/api/collections/faq", None),
        ("GET", f"/api/jobs/{faq['id']}", None),
        ("POST", "/api/search", {"query": "refund", "collection": "faq"}),
        ("POST", "/api/chat", {"message": "refund?", "collection": "faq", "stream": False}),
    ]:
        r = client.request(method, path, json=body, headers=b)
        assert r.status_code == 404, (path, r.text)
        assert "Refunds" not in r.text
    r = client.post(
        "/v1/chat/completions",
        json={"model": "rag", "collection": "faq", "messages": [{"role": "user", "content": "x"}]},
        headers=b,
    )
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "code", "param"}


def test_search_modes_k_and_filters(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    for mode in ("hybrid", "dense", "bm25"):
        r = client.post(
            "/api/search",
            json={"query": "how long do refunds take", "collection": "faq", "mode": mode, "k": 2},
            headers=a,
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert 1 <= len(results) <= 2
        assert results[0]["metadata"]["source"] == "upload:faq.md"
    r = client.post(
        "/api/search",
        json={"query": "refunds", "collection": "faq", "filters": {"source": "upload:pets.md"}},
        headers=a,
    )
    assert {h["metadata"]["source"] for h in r.json()["results"]} == {"upload:pets.md"}
    r = client.post("/api/search", json={"query": "x", "collection": "faq", "k": 0}, headers=a)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_chat_streams_events_then_follow_up_uses_history(
    env: dict[str, Any], faq: dict[str, Any]
) -> None:
    client, a = env["client"], env["a"]
    body = {"message": "How long do refunds take?", "collection": "faq", "mode": "rag"}
    with client.stream("POST", "/api/chat", json=body, headers=a) as r:
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = parse_sse(r.iter_lines())
    names = [e for e, _ in events]
    assert names[0] == "token" and names[-2:] == ["citations", "done"]
    text = "".join(d["text"] for e, d in events if e == "token")
    done = events[-1][1]
    assert text == done["answer"] == "Refunds take 5 business days [1]."
    assert done["citations"][0]["source"] == "upload:faq.md"
    assert done["usage"]["completion_tokens"] == 5
    session_id = done["session_id"]

    follow = {"message": "And shipping?", "collection": "faq", "session_id": session_id}
    r = client.post("/api/chat", json={**follow, "stream": False}, headers=a)
    assert r.status_code == 200, r.text
    last_request = env["backend"].requests[-1]
    assert any(m.content == "How long do refunds take?" for m in last_request.messages)

    detail = client.get(f"/api/sessions/{session_id}", headers=a).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"] * 2
    assert detail["messages"][1]["citations"][0]["number"] == 1
    assert session_id in [s["id"] for s in client.get("/api/sessions", headers=a).json()["data"]]
    assert client.get(f"/api/sessions/{session_id}", headers=env["b"]).status_code == 404
    assert client.delete(f"/api/sessions/{session_id}", headers=env["b"]).status_code == 404
    assert client.delete(f"/api/sessions/{session_id}", headers=a).status_code == 204
    assert client.get(f"/api/sessions/{session_id}", headers=a).status_code == 404


def test_agent_mode_streams_tool_calls_and_results(env: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    body = {"message": "what is 6 times 7?", "mode": "agent", "stream": True}
    with client.stream("POST", "/api/chat", json=body, headers=a) as r:
        events = parse_sse(r.iter_lines())
    names = [e for e, _ in events]
    assert "tool_call" in names and "tool_result" in names, names
    call = next(d for e, d in events if e == "tool_call")
    result = next(d for e, d in events if e == "tool_result")
    assert call["name"] == "calculator" and result["result"].strip().startswith("42")
    done = events[-1][1]
    assert done["tool_calls"][0]["name"] == "calculator"


def test_openai_route_shapes(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    models = client.get("/v1/models", headers=a).json()
    assert [m["id"] for m in models["data"]][:2] == ["rag", "agent"]
    msgs = [{"role": "user", "content": "How long do refunds take?"}]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "rag", "collection": "faq", "messages": msgs},
        headers=a,
    )
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"].endswith("[1].")
    assert out["citations"][0]["source"] == "upload:faq.md"
    body = {"model": "rag", "collection": "faq", "messages": msgs, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=a) as r:
        events = parse_sse(r.iter_lines())
    assert events[-1][1] == "[DONE]"
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert any("citations" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": msgs}, headers=a)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


SAMPLING = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "max_tokens": 100,
    "seed": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.3,
}


def _requests_of(env: dict[str, Any], call: Any) -> list[ChatRequest]:
    """The backend requests ``call()`` made (after checking it answered 200)."""
    before = len(env["backend"].requests)
    r = call()
    assert r.status_code == 200, r.text
    made = env["backend"].requests[before:]
    assert made, "the backend was not called"
    return list(made)


@pytest.mark.parametrize("mode", ["rag", "agent", "llm"])
def test_chat_sampling_reaches_the_backend(
    env: dict[str, Any], faq: dict[str, Any], mode: str
) -> None:
    client, a = env["client"], env["a"]
    body = {"message": "How long do refunds take?", "collection": "faq", "mode": mode}
    body |= {"stream": False, "sampling": SAMPLING}
    made = _requests_of(env, lambda: client.post("/api/chat", json=body, headers=a))
    for request in made:  # the agent's tool step and its answer alike
        assert request.sampling == SamplingOptions(**SAMPLING)


@pytest.mark.parametrize("mode", ["rag", "agent", "llm"])
def test_chat_sampling_defaults_when_unset(
    env: dict[str, Any], faq: dict[str, Any], mode: str
) -> None:
    client, a = env["client"], env["a"]
    body = {"message": "How long do refunds take?", "collection": "faq", "mode": mode}
    body |= {"stream": False, "sampling": {"top_k": 5}}
    made = _requests_of(env, lambda: client.post("/api/chat", json=body, headers=a))
    settings = env["state"].settings.agent
    assert settings.repetition_penalty == 1.1 and settings.max_answer_tokens == 256
    for request in made:
        assert request.sampling.repetition_penalty == 1.1
        assert request.sampling.max_tokens == 256
        assert request.sampling.top_k == 5
        # RAG answers greedily unless asked; the other modes keep the backend's default
        assert request.sampling.temperature == (0.0 if mode == "rag" else None)
    # an explicit 1.0 (off) is kept, not replaced by the default
    body["sampling"] = {"repetition_penalty": 1.0}
    made = _requests_of(env, lambda: client.post("/api/chat", json=body, headers=a))
    assert {r.sampling.repetition_penalty for r in made} == {1.0}


@pytest.mark.parametrize("model", ["rag", "agent", "raw"])
def test_openai_route_sampling_reaches_the_backend(
    env: dict[str, Any], faq: dict[str, Any], model: str
) -> None:
    client, a = env["client"], env["a"]
    if model == "raw":
        model = client.get("/v1/models", headers=a).json()["data"][2]["id"]
    body: dict[str, Any] = {"model": model, "collection": "faq"}
    body["messages"] = [{"role": "user", "content": "How long do refunds take?"}]
    extra = {**SAMPLING, "max_completion_tokens": SAMPLING["max_tokens"]}
    del extra["max_tokens"]
    made = _requests_of(
        env, lambda: client.post("/v1/chat/completions", json=body | extra, headers=a)
    )
    for request in made:
        assert request.sampling == SamplingOptions(**SAMPLING)
    made = _requests_of(env, lambda: client.post("/v1/chat/completions", json=body, headers=a))
    for request in made:
        assert request.sampling.repetition_penalty == 1.1
        assert request.sampling.top_k is None and request.sampling.presence_penalty is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -1),
        ("min_p", 1.5),
        ("min_p", -0.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", 2.5),
    ],
)
def test_out_of_range_sampling_is_422_naming_the_field(
    env: dict[str, Any], faq: dict[str, Any], field: str, value: float
) -> None:
    client, a = env["client"], env["a"]
    before = len(env["backend"].requests)
    body = {"message": "hi", "mode": "llm", "stream": False, "sampling": {field: value}}
    r = client.post("/api/chat", json=body, headers=a)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"sampling.{field}: ")
    messages = [{"role": "user", "content": "hi"}]
    for model in ("rag", "agent", client.get("/v1/models", headers=a).json()["data"][2]["id"]):
        openai_body = {"model": model, "collection": "faq", "messages": messages, field: value}
        r = client.post("/v1/chat/completions", json=openai_body, headers=a)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == field
        assert r.json()["error"]["message"].startswith(f"{field}: ")
    assert len(env["backend"].requests) == before  # refused before the backend


def test_repetition_penalty_setting(
    tmp_path: Path, embedder: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAGLOOM_AGENT__REPETITION_PENALTY", "1.25")
    assert Settings().agent.repetition_penalty == 1.25
    monkeypatch.setenv("RAGLOOM_AGENT__REPETITION_PENALTY", "none")
    settings = Settings(data_dir=tmp_path, api=ApiSettings(auth="off"))
    assert settings.agent.repetition_penalty is None
    monkeypatch.setenv("RAGLOOM_AGENT__REPETITION_PENALTY", "2.5")
    with pytest.raises(ValidationError, match="repetition_penalty"):
        Settings()
    backend = Script()
    app = create_app(settings, backend=backend, embedder=embedder)
    with TestClient(app) as client:  # 'none': no default is sent
        r = client.post("/api/chat", json={"message": "hi", "mode": "llm", "stream": False})
        assert r.status_code == 200, r.text
    assert backend.requests[-1].sampling.repetition_penalty is None


def test_limits_and_error_shape(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    r = client.post("/api/chat", json={"message": "x" * 501, "collection": "faq"}, headers=a)
    assert r.status_code == 413 and r.json()["error"]["code"] == "message_too_long"
    r = client.post("/api/chat", json={"message": "", "collection": "faq"}, headers=a)
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "code"}
    r = client.post(
        "/api/chat", content=b"{not json", headers={**a, "content-type": "application/json"}
    )
    assert r.status_code == 422
    r = client.post("/api/chat", json={"message": "hi", "mode": "rag"}, headers=a)
    assert r.status_code == 422 and r.json()["error"]["code"] == "collection_required"
    r = client.post("/api/chat", json={"message": "x" * 2_000_000}, headers=a)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    big = [("files", ("big.txt", b"a" * 20_000, "text/plain"))]
    r = client.post("/api/collections/faq/documents", files=big, headers=a)
    assert r.status_code == 413 and "big.txt" in r.json()["error"]["message"]
    r = client.post("/api/collections", json={"name": "../etc"}, headers=a)
    assert r.status_code == 422
    r = client.post("/api/collections", json={"name": "faq"}, headers=a)
    assert r.status_code == 409


def test_rate_limit_answers_429_with_retry_after(env: dict[str, Any]) -> None:
    limiter = env["state"].rate_limiter
    saved = (limiter.capacity, limiter.rate, dict(limiter._buckets))
    limiter.capacity, limiter.rate, limiter._buckets = 2.0, 2.0 / 60, {}
    try:
        codes = [env["client"].get("/api/sessions", headers=env["b"]).status_code for _ in range(3)]
        assert codes[:2] == [200, 200] and codes[2] == 429
        r = env["client"].get("/api/sessions", headers=env["b"])
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        limiter.capacity, limiter.rate, limiter._buckets = saved


def test_delete_document_and_collection(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    docs = client.get("/api/collections/faq/documents", headers=a).json()["data"]
    pets = next(d for d in docs if d["source"] == "upload:pets.md")
    assert (
        client.delete(
            f"/api/collections/faq/documents/{pets['doc_id']}", headers=env["b"]
        ).status_code
        == 404
    )
    assert (
        client.delete(f"/api/collections/faq/documents/{pets['doc_id']}", headers=a).status_code
        == 204
    )
    r = client.post(
        "/api/search",
        json={"query": "dog cat pet fee", "collection": "faq", "mode": "bm25"},
        headers=a,
    )
    assert all(h["doc_id"] != pets["doc_id"] for h in r.json()["results"])
    assert client.delete("/api/collections/faq/documents/nope", headers=a).status_code == 404


def test_ready_and_metrics(env: dict[str, Any], faq: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    r = client.get("/ready", headers=a)
    assert r.status_code == 200 and r.json()["checks"]["backend"] == "ok"
    text = client.get("/metrics", headers=a).text
    assert 'ragloom_api_requests_total{method="POST",route="/api/chat",status="200"}' in text
    assert "ragloom_api_ttft_seconds_count" in text
    env["backend"].healthy = False
    try:
        r = client.get("/ready", headers=a)
        assert r.status_code == 503 and "scripted" in r.json()["error"]["message"]
    finally:
        env["backend"].healthy = True


def test_auth_off_uses_local_tenant(tmp_path: Path, embedder: Any) -> None:
    app = create_app(make_settings(tmp_path, auth="off"), backend=Script(), embedder=embedder)
    with TestClient(app) as client:
        r = client.post("/api/chat", json={"message": "hi", "mode": "llm", "stream": False})
        assert r.status_code == 200 and r.json()["answer"] == "echo: hi"


def test_another_writer_process_gets_clear_errors(env: dict[str, Any], faq: dict[str, Any]) -> None:
    from retrieval import WriterLock

    client, a = env["client"], env["a"]
    with WriterLock(env["data_dir"]):  # as if `ragloom ingest` were running
        r = client.post("/api/collections", json={"name": "other"}, headers=a)
        assert r.status_code == 409 and r.json()["error"]["code"] == "writer_locked"
        files = [("files", ("late.md", b"# Late\n\nA late file.", "text/markdown"))]
        r = client.post("/api/collections/faq/documents", files=files, headers=a)
        job = wait_job(client, r.json()["id"], a)
    assert job["status"] == "failed" and "writ" in job["error"]
    r = client.post("/api/collections", json={"name": "other"}, headers=a)
    assert r.status_code == 201


class Stalling(Script):
    """Streams one piece, then stalls (a backend that hangs mid-answer)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk("Hello")
        await asyncio.sleep(30)
        yield ChatChunk(" never", finish_reason="stop")


def test_request_timeout_504_and_error_event(tmp_path: Path, embedder: Any) -> None:
    settings = make_settings(tmp_path, auth="off", request_timeout_s=0.5)
    app = create_app(settings, backend=Stalling(), embedder=embedder)
    with TestClient(app) as client:
        body = {"message": "hi", "mode": "llm", "stream": False}
        r = client.post("/api/chat", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with client.stream("POST", "/api/chat", json={**body, "stream": True}) as r:
            events = parse_sse(r.iter_lines())
        assert [e for e, _ in events] == ["token", "error"]
        assert events[1][1]["error"]["code"] == "timeout"
