"""One contract, checked the same way for every ChatBackend implementation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from llm_backend import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    OpenAICompatBackend,
    SamplingOptions,
    ScriptedBackend,
    ToolCall,
)
from tests.llm_backend.conftest import ENGINE_MODEL
from tests.llm_backend.wire_server import MODEL

LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up in the dictionary.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
GREEDY = SamplingOptions(temperature=0, max_tokens=24, seed=0)


def plain_request() -> ChatRequest:
    return ChatRequest(
        [
            ChatMessage.system("You are a helpful assistant."),
            ChatMessage.user("What is the capital of France?"),
        ],
        sampling=GREEDY,
    )


def tool_request() -> ChatRequest:
    return ChatRequest(
        [ChatMessage.user("Look up the word 'apple'.")],
        tools=[LOOKUP_TOOL],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        sampling=SamplingOptions(temperature=0, max_tokens=48),
    )


def _rule(request: ChatRequest) -> ChatResponse:
    """Deterministic behaviour for the scripted backend: a forced tool, else an echo."""
    if isinstance(request.tool_choice, dict):
        text = request.messages[-1].content or ""
        return ChatResponse(
            "", [ToolCall("call_0", "lookup", json.dumps({"query": text}))], "tool_calls"
        )
    return ChatResponse(f"You asked: {request.messages[-1].content}")


@dataclass
class Case:
    backend: ChatBackend


Factory = Callable[[pytest.FixtureRequest], Case]


def scripted_case(request: pytest.FixtureRequest) -> Case:
    return Case(ScriptedBackend([_rule] * 20, chunk_size=3))


def openai_compat_case(request: pytest.FixtureRequest) -> Case:
    base_url, _state = request.getfixturevalue("wire_server")
    return Case(OpenAICompatBackend(base_url, MODEL, read_timeout=30))


def local_engine_case(request: pytest.FixtureRequest) -> Case:
    """Our engine in-process on the real SmolLM2 model."""
    return Case(request.getfixturevalue("local_engine"))


def engine_server_case(request: pytest.FixtureRequest) -> Case:
    """The OpenAI client against our engine's real server on loopback."""
    base_url = request.getfixturevalue("engine_server")
    return Case(OpenAICompatBackend(base_url, ENGINE_MODEL, read_timeout=120))


CASES: dict[str, Factory] = {
    "scripted": scripted_case,
    "openai-compat-loopback": openai_compat_case,
    "local-engine": local_engine_case,
    "openai-compat-engine-server": engine_server_case,
}
SLOW_CASES = {"local-engine", "openai-compat-engine-server"}


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.slow, pytest.mark.integration])
        if name in SLOW_CASES
        else name
        for name in sorted(CASES)
    ]
)
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param](request)


async def collect(stream: AsyncIterator) -> list:  # type: ignore[type-arg]
    return [chunk async for chunk in stream]


def test_implements_the_protocol(case: Case) -> None:
    assert isinstance(case.backend, ChatBackend)
    assert case.backend.name and case.backend.context_window > 0


async def test_health(case: Case) -> None:
    assert await case.backend.health() is True


def test_count_tokens_grows_with_the_prompt(case: Case) -> None:
    one = case.backend.count_tokens([ChatMessage.user("hello")])
    two = case.backend.count_tokens(
        [ChatMessage.user("hello"), ChatMessage.assistant("a much longer answer " * 10)]
    )
    assert 0 < one < two


async def test_chat_returns_content(case: Case) -> None:
    reply = await case.backend.chat(plain_request())
    assert reply.content.strip()
    assert reply.finish_reason in ("stop", "length") and reply.tool_calls == []
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0


async def test_stream_concatenates_to_chat(case: Case) -> None:
    reply = await case.backend.chat(plain_request())
    chunks = await collect(case.backend.stream(plain_request()))
    assert "".join(chunk.delta for chunk in chunks) == reply.content
    assert len([chunk for chunk in chunks if chunk.delta]) > 1
    finishes = [chunk.finish_reason for chunk in chunks if chunk.finish_reason]
    assert finishes == [reply.finish_reason] and chunks[-1].finish_reason == reply.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


async def test_named_tool_call_has_the_right_shape(case: Case) -> None:
    reply = await case.backend.chat(tool_request())
    assert reply.finish_reason == "tool_calls"
    assert reply.tool_calls and {call.name for call in reply.tool_calls} == {"lookup"}
    for call in reply.tool_calls:
        assert call.id
        assert isinstance(call.parsed_arguments().get("query"), str)

    chunks = await collect(case.backend.stream(tool_request()))
    streamed = [call for chunk in chunks for call in chunk.tool_calls]
    assert [c.name for c in streamed] == [c.name for c in reply.tool_calls]
    assert [c.parsed_arguments() for c in streamed] == [
        c.parsed_arguments() for c in reply.tool_calls
    ]
    assert chunks[-1].finish_reason == "tool_calls"


async def test_stream_can_be_abandoned(case: Case) -> None:
    stream = case.backend.stream(plain_request())
    first = await anext(stream)  # type: ignore[call-overload]
    assert first.delta or first.finish_reason
    await stream.aclose()  # type: ignore[attr-defined]
    reply = await case.backend.chat(plain_request())  # still usable afterwards
    assert reply.content.strip()
