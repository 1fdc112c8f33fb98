"""The API for real: uvicorn on loopback, SmolLM2 behind our engine server, Chroma + MiniLM.

Clients are the official ``openai`` package, LangChain's ``ChatOpenAI`` and
plain httpx (SSE). The tiny model's wording is not asserted; shapes, citations
mapping to uploaded files, tool calls, the auth matrix, limits, a dead backend
and cancellation on disconnect are.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import create_key
from app.main import create_app
from app.settings import AgentSettings, ApiSettings, LLMSettings, Settings
from tests.app.conftest import FAQ, PETS, parse_sse, wait_job
from tests.app.servers import MODEL, api_server, engine_server, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _settings(data_dir: Path, base_url: str, **api: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        agent=AgentSettings(
            backend="openai", base_url=base_url, model=MODEL, max_answer_tokens=32, min_score=0.0
        ),
        llm=LLMSettings(connect_timeout_s=2.0, request_timeout_s=60.0),
        api=ApiSettings(**api),
    )


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    with engine_server() as url:
        yield url


@pytest.fixture(scope="module")
def live(
    engine_url: str, tmp_path_factory: pytest.TempPathFactory, embedder: Any
) -> Iterator[dict[str, Any]]:
    """The API over the engine, with tenant acme's collection 'faq' uploaded."""
    data_dir = tmp_path_factory.mktemp("live")
    app = create_app(_settings(data_dir, engine_url), embedder=embedder)
    db = app.state.ragloom.db
    key_a, key_b = create_key(db, "acme")[1], create_key(db, "globex")[1]
    with api_server(app) as url:
        a = {"Authorization": f"Bearer {key_a}"}
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.post("/api/collections", json={"name": "faq"}, headers=a).is_success
            files = [
                ("files", ("faq.md", FAQ.encode(), "text/markdown")),
                ("files", ("pets.md", PETS.encode(), "text/markdown")),
            ]
            r = client.post("/api/collections/faq/documents", files=files, headers=a)
            job = wait_job(client, r.json()["id"], a)
            assert job["status"] == "succeeded", job
            yield {
                "url": url,
                "client": client,
                "key_a": key_a,
                "a": a,
                "b": {"Authorization": f"Bearer {key_b}"},
                "engine": engine_url,
            }


def test_openai_client_rag_plain_and_streaming(live: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live['url']}/v1", api_key=live["key_a"], max_retries=0)
    assert {m.id for m in client.models.list()} >= {"rag", "agent", MODEL}
    question: Any = [{"role": "user", "content": "How long do refunds take?"}]
    reply = client.chat.completions.create(
        model="rag",
        messages=question,
        extra_body={"collection": "faq"},  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    for cite in (reply.model_extra or {}).get("citations", []):
        assert cite["source"] in ("upload:faq.md", "upload:pets.md")

    stream: Any = client.chat.completions.create(
        model=MODEL,
        messages=question,
        stream=True,
        max_tokens=16,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip()


def test_openai_client_tools_passthrough(live: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live['url']}/v1", api_key=live["key_a"], max_retries=0)
    tool: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[tool],
        tool_choice="required",
        max_tokens=64,
        temperature=0,  # greedy: a sampled 135M model can ramble inside the JSON string
    )
    calls = reply.choices[0].message.tool_calls or []
    assert reply.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert "city" in json.loads(calls[0].function.arguments)  # type: ignore[union-attr]


def test_langchain_chat_openai(live: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        base_url=f"{live['url']}/v1",
        api_key=live["key_a"],  # type: ignore[arg-type]
        model="rag",
        max_retries=0,
        extra_body={"collection": "faq"},
    )
    assert isinstance(model.invoke("How long do refunds take?").content, str)
    text = "".join(str(c.content) for c in model.stream("Can I bring my dog?"))
    assert text.strip()


def test_api_chat_sse_with_citations_and_session(live: dict[str, Any]) -> None:
    client, a = live["client"], live["a"]
    body = {"message": "How many days until a refund is paid?", "collection": "faq"}
    with client.stream("POST", "/api/chat", json=body, headers=a) as r:
        assert r.status_code == 200
        assert r.headers["x-accel-buffering"] == "no"
        events = parse_sse(r.iter_lines())
    names = [e for e, _ in events]
    assert names[0] == "token" and names[-2:] == ["citations", "done"], names
    done = events[-1][1]
    assert "".join(d["text"] for e, d in events if e == "token") == done["answer"]
    for cite in done["citations"]:
        assert re.search(rf"\[{cite['number']}\]", done["answer"])
        assert cite["source"] in ("upload:faq.md", "upload:pets.md")
    assert done["timings"]["total_ms"] > 0
    detail = client.get(f"/api/sessions/{done['session_id']}", headers=a).json()
    assert detail["messages"][0]["content"] == body["message"]


def test_auth_matrix_over_http(live: dict[str, Any]) -> None:
    client = live["client"]
    assert client.get("/health").status_code == 200
    assert client.get("/api/collections").status_code == 401
    bad = {"Authorization": "Bearer " + live["key_a"][:-4] + "AAAA"}
    assert client.get("/api/collections", headers=bad).status_code == 401
    search = {"query": "refund", "collection": "faq"}
    assert client.post("/api/search", json=search, headers=live["b"]).status_code == 404
    assert client.post("/api/search", json=search, headers=live["a"]).status_code == 200


def test_ready_and_metrics_over_http(live: dict[str, Any]) -> None:
    client, a = live["client"], live["a"]
    ready = client.get("/ready", headers=a)
    assert ready.status_code == 200, ready.text
    metrics = client.get("/metrics", headers=a).text
    assert re.search(r'ragloom_api_ttft_seconds_count\{mode="rag"\} [1-9]', metrics)


def _engine_aborts(engine_url: str) -> float:
    text = httpx.get(engine_url.removesuffix("/v1") + "/metrics", timeout=5).text
    pattern = r'^ragloom_engine_requests_finished_total\{[^}]*reason="abort"[^}]*\} (\S+)$'
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def test_disconnect_cancels_generation_upstream(live: dict[str, Any]) -> None:
    body = {
        "message": "Count from 1 to 1000, one number per line.",
        "mode": "llm",
        "sampling": {"max_tokens": 1500, "temperature": 0},
    }
    aborts = _engine_aborts(live["engine"])
    with (
        httpx.Client(base_url=live["url"], timeout=60) as client,
        client.stream("POST", "/api/chat", json=body, headers=live["a"]) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break
    deadline = time.monotonic() + 10
    while _engine_aborts(live["engine"]) <= aborts:
        assert time.monotonic() < deadline, "the engine kept generating after the disconnect"
        time.sleep(0.2)


def test_backend_down_is_503_within_2s(tmp_path: Path, embedder: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    app = create_app(_settings(tmp_path, dead, auth="off"), embedder=embedder)
    with api_server(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        started = time.monotonic()
        r = client.post("/api/chat", json={"message": "hi", "mode": "llm"})
        assert time.monotonic() - started < 2.5
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "backend_unavailable" and "openai-compat" in error["message"]
        assert dead in error["message"]
        r = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        )
        assert r.status_code == 503 and r.json()["error"]["param"] is None
        ready = client.get("/ready")
        assert ready.status_code == 503 and "openai-compat" in ready.json()["checks"]["backend"]
