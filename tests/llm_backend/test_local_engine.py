"""LocalEngineBackend on the real SmolLM2 model, and the OpenAI client against its server."""

from __future__ import annotations

import asyncio
import json

import pytest

from llm_backend import (
    BadRequest,
    ChatMessage,
    ChatRequest,
    ContextTooLong,
    OpenAICompatBackend,
    SamplingOptions,
)
from llm_backend.local_engine import LocalEngineBackend
from tests.llm_backend.conftest import ENGINE_CONTEXT, ENGINE_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GREEDY = SamplingOptions(temperature=0, max_tokens=24)
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


def capital_question() -> ChatRequest:
    return ChatRequest(
        [
            ChatMessage.system("You are a helpful assistant."),
            ChatMessage.user("What is the capital of France?"),
        ],
        sampling=GREEDY,
    )


async def test_answers_a_question(local_engine: LocalEngineBackend) -> None:
    reply = await local_engine.chat(capital_question())
    assert "Paris" in reply.content
    assert reply.model == ENGINE_MODEL and reply.finish_reason == "stop"
    assert reply.usage is not None
    # count_tokens renders the same chat template: exact, not an estimate
    assert local_engine.count_tokens(capital_question().messages) == reply.usage.prompt_tokens
    assert local_engine.context_window == ENGINE_CONTEXT


async def test_named_tool_call_has_valid_json_arguments(local_engine: LocalEngineBackend) -> None:
    request = ChatRequest(
        [ChatMessage.user("Look up the word 'apple'.")],
        tools=[LOOKUP_TOOL],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        sampling=SamplingOptions(temperature=0.7, seed=3, max_tokens=48),
    )
    reply = await local_engine.chat(request)
    [call] = reply.tool_calls
    assert call.name == "lookup" and reply.finish_reason == "tool_calls"
    arguments = json.loads(call.arguments)  # grammar-constrained: always valid JSON
    assert set(arguments) == {"query"} and isinstance(arguments["query"], str)


async def test_response_format_json_schema_is_enforced(local_engine: LocalEngineBackend) -> None:
    # The bound is part of what is enforced, and it makes the grammar close the number:
    # greedy SmolLM2 with a bf16 KV cache repeats "1" past max_tokens without one.
    population = {"type": "integer", "minimum": 0, "maximum": 99_999_999}
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": population},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    request = ChatRequest(
        [ChatMessage.user("Give the largest city of France and its population.")],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        sampling=SamplingOptions(temperature=0, max_tokens=48),
    )
    reply = await local_engine.chat(request)
    assert reply.finish_reason == "stop"
    value = json.loads(reply.content)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)
    assert 0 <= value["population"] <= 99_999_999


async def test_too_long_prompt_is_context_too_long(local_engine: LocalEngineBackend) -> None:
    request = ChatRequest([ChatMessage.user("word " * 3000)], sampling=GREEDY)
    with pytest.raises(ContextTooLong) as info:
        await local_engine.chat(request)
    assert info.value.limit == ENGINE_CONTEXT
    assert info.value.prompt_tokens is not None and info.value.prompt_tokens > ENGINE_CONTEXT


async def test_bad_requests_are_refused_clearly(local_engine: LocalEngineBackend) -> None:
    with pytest.raises(BadRequest, match="other-model"):
        await local_engine.chat(ChatRequest([ChatMessage.user("hi")], model="other-model"))
    with pytest.raises(BadRequest, match="temperature"):
        await local_engine.chat(
            ChatRequest([ChatMessage.user("hi")], sampling=SamplingOptions(temperature=3.0))
        )


async def test_abandoned_stream_frees_its_slot(local_engine: LocalEngineBackend) -> None:
    request = ChatRequest(
        [ChatMessage.user("Write a long story about a dragon.")],
        sampling=SamplingOptions(temperature=0, max_tokens=400),
    )
    stream = local_engine.stream(request)
    pieces = []
    async for chunk in stream:  # type: ignore[attr-defined]
        pieces.append(chunk.delta)
        if len(pieces) == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(200):
        if local_engine.engine.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert local_engine.engine.num_running == 0


async def test_in_process_and_over_http_give_the_same_answer(
    local_engine: LocalEngineBackend, engine_server: str
) -> None:
    remote = OpenAICompatBackend(engine_server, ENGINE_MODEL, read_timeout=120)
    assert await remote.health() is True
    assert remote.context_window == ENGINE_CONTEXT  # read from the server's max_model_len
    here = await local_engine.chat(capital_question())
    there = await remote.chat(capital_question())
    assert there.content == here.content and there.usage == here.usage
    tool_request = ChatRequest(
        [ChatMessage.user("Look up the word 'pear'.")],
        tools=[LOOKUP_TOOL],
        tool_choice="required",
        sampling=SamplingOptions(temperature=0, max_tokens=48),
    )
    [call] = (await remote.chat(tool_request)).tool_calls
    assert call.name == "lookup" and isinstance(call.parsed_arguments()["query"], str)
    with pytest.raises(ContextTooLong) as info:
        await remote.chat(ChatRequest([ChatMessage.user("word " * 3000)], sampling=GREEDY))
    assert info.value.limit == ENGINE_CONTEXT and info.value.prompt_tokens is not None


async def test_langchain_model_and_agent_over_the_real_engine(
    local_engine: LocalEngineBackend,
) -> None:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool

    from llm_backend import ChatBackendModel

    looked_up: list[str] = []

    @tool
    def lookup(query: str) -> str:
        """Look a word up in the dictionary."""
        looked_up.append(query)
        return f"{query}: a kind of fruit."

    model = ChatBackendModel(
        backend=local_engine, sampling=SamplingOptions(temperature=0, max_tokens=48)
    )
    forced = await model.bind_tools([lookup], tool_choice="lookup").ainvoke(
        "Look up the word 'apple'."
    )
    assert isinstance(forced, AIMessage) and forced.invalid_tool_calls == []
    [call] = forced.tool_calls
    assert call["name"] == "lookup" and isinstance(call["args"]["query"], str)

    agent = create_agent(model, tools=[lookup], system_prompt="Use tools when helpful.")
    result = await agent.ainvoke({"messages": [("user", "Look up the word 'apple'.")]})
    messages = result["messages"]
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    # whatever the small model chose, every call it made ran and was answered
    assert len(calls) == len(tool_results) == len(looked_up)
    assert all(c["name"] == "lookup" for c in calls)
