"""OpenAICompatBackend against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import pytest

from llm_backend import (
    BackendUnavailable,
    BadRequest,
    ChatMessage,
    ChatRequest,
    ContextTooLong,
    OpenAICompatBackend,
    SamplingOptions,
)
from tests.llm_backend.wire_server import MAX_MODEL_LEN, MODEL, WireState, free_port

pytestmark = pytest.mark.integration

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the knowledge base.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}


def ask(text: str, **kwargs: object) -> ChatRequest:
    return ChatRequest([ChatMessage.system("Be brief."), ChatMessage.user(text)], **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def backend(wire_server: tuple[str, WireState]) -> OpenAICompatBackend:
    return OpenAICompatBackend(wire_server[0], MODEL, read_timeout=10)


async def test_chat_sends_sampling_and_reads_the_answer(
    backend: OpenAICompatBackend, wire_server: tuple[str, WireState]
) -> None:
    state = wire_server[1]
    sampling = SamplingOptions(
        temperature=0.0,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        max_tokens=32,
        seed=7,
    )
    reply = await backend.chat(ask("hello there", sampling=sampling, stop=["\n\n"]))
    assert reply.content == "echo: hello there"
    assert reply.finish_reason == "stop" and reply.tool_calls == []
    assert reply.model == MODEL
    assert reply.usage is not None and reply.usage.prompt_tokens == 4
    body = state.requests[-1]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        0.0,
        0.9,
        32,
        7,
    )
    # non-OpenAI sampling fields travel as extra body fields, at the top level
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (20, 0.05, 1.1)
    assert body["stop"] == ["\n\n"] and "tools" not in body


async def test_stream_concatenates_to_the_chat_content(backend: OpenAICompatBackend) -> None:
    request = ask("one two three four", sampling=SamplingOptions(temperature=0))
    full = await backend.chat(request)
    chunks = [chunk async for chunk in backend.stream(request)]
    assert len([c for c in chunks if c.delta]) > 3
    assert "".join(c.delta for c in chunks) == full.content
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == full.usage


async def test_tools_are_sent_strict_and_tool_calls_come_back(
    backend: OpenAICompatBackend, wire_server: tuple[str, WireState]
) -> None:
    request = ask(
        "refund policy",
        tools=[SEARCH_TOOL],
        tool_choice={"type": "function", "function": {"name": "search"}},
        response_format=None,
    )
    reply = await backend.chat(request)
    body = wire_server[1].requests[-1]
    assert body["tools"][0]["function"]["strict"] is True
    assert "strict" not in SEARCH_TOOL["function"]  # the caller's dict is not modified
    assert body["tool_choice"] == {"type": "function", "function": {"name": "search"}}
    assert reply.finish_reason == "tool_calls" and reply.content == ""
    [call] = reply.tool_calls
    assert (call.id, call.name) == ("call_wire_1", "search")
    assert call.parsed_arguments() == {"query": "refund policy"}

    chunks = [chunk async for chunk in backend.stream(request)]
    streamed = [call for chunk in chunks for call in chunk.tool_calls]
    assert streamed == reply.tool_calls  # fragments joined into one complete call
    assert chunks[-1].finish_reason == "tool_calls"


async def test_response_format_is_passed_through(
    backend: OpenAICompatBackend, wire_server: tuple[str, WireState]
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    await backend.chat(ask("x", response_format=response_format))
    assert wire_server[1].requests[-1]["response_format"] == response_format


async def test_context_overflow_becomes_context_too_long(backend: OpenAICompatBackend) -> None:
    for call in (backend.chat, lambda r: _drain(backend, r)):
        with pytest.raises(ContextTooLong) as info:
            await call(ask("CONTEXT please"))
        assert (info.value.prompt_tokens, info.value.limit) == (2000, 2048)


async def test_other_4xx_becomes_bad_request(backend: OpenAICompatBackend) -> None:
    with pytest.raises(BadRequest, match=r"HTTP 400.*temperature must be non-negative"):
        await backend.chat(ask("BAD request"))


async def _drain(backend: OpenAICompatBackend, request: ChatRequest) -> None:
    async for _ in backend.stream(request):
        pass


async def test_nothing_listening_fails_fast_with_the_url_named() -> None:
    port = free_port()  # bound then released: nothing listens there
    backend = OpenAICompatBackend(f"http://127.0.0.1:{port}", MODEL, connect_timeout=2.0)
    assert backend.base_url == f"http://127.0.0.1:{port}/v1"
    for call in (backend.chat, lambda r: _drain(backend, r)):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            await call(ask("hi"))
        assert time.monotonic() - started < 2.5
        assert f"127.0.0.1:{port}" in str(info.value) and "openai-compat" in str(info.value)
    started = time.monotonic()
    assert await backend.health() is False
    assert time.monotonic() - started < 2.5


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (kernel backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_server_that_never_answers_times_out(silent_port: int) -> None:
    backend = OpenAICompatBackend(
        f"http://127.0.0.1:{silent_port}/v1", MODEL, connect_timeout=1.0, read_timeout=1.0
    )
    for call in (backend.chat, lambda r: _drain(backend, r)):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="timed out"):
            await call(ask("hi"))
        assert time.monotonic() - started < 4.0


async def test_closing_a_stream_early_disconnects_from_the_server(
    backend: OpenAICompatBackend, wire_server: tuple[str, WireState]
) -> None:
    state = wire_server[1]
    state.endless_closed.clear()
    stream = backend.stream(ask("ENDLESS story"))
    received = []
    async for chunk in stream:  # type: ignore[attr-defined]
        received.append(chunk.delta)
        if len(received) == 5:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert state.endless_started.is_set()
    for _ in range(250):  # the server notices the disconnect and stops generating
        if state.endless_closed.is_set():
            break
        await asyncio.sleep(0.02)
    assert state.endless_closed.is_set()
    assert "".join(received).startswith("more more")


async def test_health_reads_the_servers_context_window(backend: OpenAICompatBackend) -> None:
    assert backend.context_window == 4096
    assert await backend.health() is True
    assert backend.context_window == MAX_MODEL_LEN


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAICompatBackend("127.0.0.1:8000", MODEL)
    with pytest.raises(ValueError, match="timeouts must be > 0"):
        OpenAICompatBackend("http://127.0.0.1:8000", MODEL, connect_timeout=0)


def test_tool_json_is_not_mutated_by_strict() -> None:
    from llm_backend.openai_compat import strict_tools

    out = strict_tools([SEARCH_TOOL])
    assert out[0]["function"]["strict"] is True and json.dumps(SEARCH_TOOL).count("strict") == 0
