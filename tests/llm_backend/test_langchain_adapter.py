"""ChatBackendModel: LangChain agents and chains over any ChatBackend."""

from __future__ import annotations

import json

import pytest
from langchain.agents import create_agent
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel

from llm_backend import (
    ChatBackendModel,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    OpenAICompatBackend,
    SamplingOptions,
    ScriptedBackend,
    ToolCall,
    Usage,
)
from llm_backend.langchain_adapter import normalise_tool_choice, to_chat_messages
from tests.llm_backend.wire_server import MODEL, WireState

WEATHER_CALLS: list[str] = []


@tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    WEATHER_CALLS.append(city)
    return f"sunny, 21 C in {city}"


class Answer(BaseModel):
    answer: str
    confidence: float


def weather_script() -> ScriptedBackend:
    def final(request: ChatRequest) -> ChatResponse:
        result = request.messages[-1]
        assert result.role == "tool" and result.tool_call_id == "call_1"
        return ChatResponse(f"The weather: {result.content}.", usage=Usage(40, 8))

    return ScriptedBackend(
        [
            ChatResponse(
                "",
                [ToolCall("call_1", "get_weather", '{"city": "Paris"}')],
                "tool_calls",
                Usage(30, 5),
            ),
            final,
        ]
    )


def check_weather_run(backend: ScriptedBackend, messages: list) -> None:
    assert WEATHER_CALLS[-1] == "Paris"  # the real tool ran with the model's arguments
    assert isinstance(messages[-1], AIMessage)
    assert messages[-1].content == "The weather: sunny, 21 C in Paris."
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_messages] == ["sunny, 21 C in Paris"]
    first, second = backend.requests
    assert [t["function"]["name"] for t in first.tools or []] == ["get_weather"]
    assert first.tools[0]["function"]["parameters"]["properties"]["city"]["type"] == "string"  # type: ignore[index]
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "tool"]
    assert second.messages[2].tool_calls == [ToolCall("call_1", "get_weather", '{"city": "Paris"}')]
    assert first.sampling.temperature == 0.0
    assert backend.remaining == 0


def test_create_agent_runs_a_tool_then_answers() -> None:
    backend = weather_script()
    model = ChatBackendModel(backend=backend, sampling=SamplingOptions(temperature=0))
    agent = create_agent(model, tools=[get_weather], system_prompt="You are helpful.")
    result = agent.invoke({"messages": [HumanMessage("Weather in Paris?")]})
    check_weather_run(backend, result["messages"])
    assert result["messages"][1].usage_metadata["input_tokens"] == 30


async def test_create_agent_async_and_streaming() -> None:
    backend = weather_script()
    model = ChatBackendModel(backend=backend, sampling=SamplingOptions(temperature=0))
    agent = create_agent(model, tools=[get_weather], system_prompt="You are helpful.")
    tokens = []
    final_state: dict = {}
    async for mode, data in agent.astream(
        {"messages": [HumanMessage("Weather in Paris?")]}, stream_mode=["messages", "values"]
    ):
        if mode == "values":
            final_state = data
        elif isinstance(data[0], AIMessageChunk) and data[0].content:
            tokens.append(data[0].content)
    assert "".join(tokens) == "The weather: sunny, 21 C in Paris."
    assert len(tokens) > 10  # streamed piece by piece, not in one go
    check_weather_run(backend, final_state["messages"])


def test_streamed_tool_calls_merge_into_tool_calls() -> None:
    backend = ScriptedBackend(
        [ChatResponse("ok", [ToolCall("c1", "get_weather", '{"city": "Oslo"}')], "tool_calls")]
    )
    model = ChatBackendModel(backend=backend).bind_tools([get_weather], tool_choice="get_weather")
    merged = None
    for chunk in model.stream("weather?"):
        merged = chunk if merged is None else merged + chunk
    assert isinstance(merged, AIMessageChunk)
    assert merged.content == "ok"
    assert merged.tool_calls == [
        {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"}
    ]
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert merged.usage_metadata is not None and merged.usage_metadata["output_tokens"] > 0
    assert backend.requests[0].tool_choice == {
        "type": "function",
        "function": {"name": "get_weather"},
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("any", "required"),
        (True, "required"),
        (None, None),
        ("search", {"type": "function", "function": {"name": "search"}}),
        ({"name": "search"}, {"type": "function", "function": {"name": "search"}}),
    ],
)
def test_tool_choice_spellings(given: object, expected: object) -> None:
    assert normalise_tool_choice(given) == expected


def test_bad_tool_choice_and_arguments_are_refused() -> None:
    model = ChatBackendModel(backend=ScriptedBackend([]))
    with pytest.raises(ValueError, match="'calculator', not one of the bound tools"):
        model.bind_tools([get_weather], tool_choice="calculator")
    with pytest.raises(ValueError, match=r"unsupported chat model arguments \['temprature'\]"):
        model.invoke("hi", temprature=0.2)
    with pytest.raises(TypeError, match=r"must implement llm_backend\.ChatBackend"):
        ChatBackendModel(backend=object())


def test_message_conversion_keeps_tool_call_links() -> None:
    converted = to_chat_messages(
        [
            SystemMessage("sys"),
            HumanMessage([{"type": "text", "text": "a"}, "b"]),
            AIMessage("", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "t1"}]),
            ToolMessage("result", tool_call_id="t1"),
        ]
    )
    assert converted == [
        ChatMessage.system("sys"),
        ChatMessage.user("ab"),
        ChatMessage.assistant(None, [ToolCall("t1", "f", '{"x": 1}')]),
        ChatMessage.tool("result", "t1"),
    ]
    with pytest.raises(ValueError, match="only text content"):
        to_chat_messages([HumanMessage([{"type": "image_url", "image_url": {"url": "x"}}])])


def test_unparsable_arguments_become_invalid_tool_calls() -> None:
    backend = ScriptedBackend(
        [ChatResponse("", [ToolCall("c1", "get_weather", '"Paris"')], "tool_calls")]
    )
    message = ChatBackendModel(backend=backend).bind_tools([get_weather]).invoke("weather?")
    assert message.tool_calls == []
    [invalid] = message.invalid_tool_calls
    assert invalid["name"] == "get_weather" and invalid["args"] == '"Paris"'
    assert "not a JSON object" in str(invalid["error"])


def test_structured_output_sends_the_json_schema() -> None:
    def answer(request: ChatRequest) -> ChatResponse:
        assert request.response_format is not None
        return ChatResponse(json.dumps({"answer": "42", "confidence": 0.9}))

    backend = ScriptedBackend([answer, answer])
    model = ChatBackendModel(backend=backend)
    parsed = model.with_structured_output(Answer).invoke("meaning of life?")
    assert parsed == Answer(answer="42", confidence=0.9)
    response_format = backend.requests[0].response_format
    assert response_format is not None and response_format["type"] == "json_schema"
    schema = response_format["json_schema"]["schema"]
    assert set(schema["properties"]) == {"answer", "confidence"}
    raw = model.with_structured_output(Answer, include_raw=True).invoke("again?")
    assert isinstance(raw["raw"], AIMessage) and raw["parsed"] == parsed
    assert raw["parsing_error"] is None


def test_structured_output_by_function_calling() -> None:
    backend = ScriptedBackend(
        [
            ChatResponse(
                "", [ToolCall("c", "Answer", '{"answer": "x", "confidence": 1}')], "tool_calls"
            )
        ]
    )
    parsed = (
        ChatBackendModel(backend=backend)
        .with_structured_output(Answer, method="function_calling")
        .invoke("q")
    )
    assert parsed == Answer(answer="x", confidence=1.0)
    assert backend.requests[0].tool_choice == {"type": "function", "function": {"name": "Answer"}}


def test_bad_structured_output_is_reported_not_raised_with_include_raw() -> None:
    backend = ScriptedBackend([ChatResponse("not json at all")])
    result = (
        ChatBackendModel(backend=backend)
        .with_structured_output(Answer, include_raw=True)
        .invoke("q")
    )
    assert result["parsed"] is None and result["parsing_error"] is not None


async def test_sync_invoke_inside_a_running_loop_uses_the_private_loop() -> None:
    backend = ScriptedBackend([ChatResponse("fine")])
    # a running loop here: asyncio.run would fail; the adapter's own loop thread does not
    assert ChatBackendModel(backend=backend).invoke("hi").content == "fine"


@pytest.mark.integration
async def test_over_a_real_openai_server(wire_server: tuple[str, WireState]) -> None:
    base_url, state = wire_server
    model = ChatBackendModel(
        backend=OpenAICompatBackend(base_url, MODEL), sampling=SamplingOptions(temperature=0)
    )
    message = await model.ainvoke("hello world")
    assert message.content == "echo: hello world"
    assert message.usage_metadata is not None and message.usage_metadata["input_tokens"] == 2

    bound = model.bind_tools([get_weather], tool_choice="required")
    merged = None
    async for chunk in bound.astream("Rome"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None and merged.tool_calls[0]["args"] == {"query": "Rome"}
    assert state.requests[-1]["tool_choice"] == "required"
    assert state.requests[-1]["tools"][0]["function"]["name"] == "get_weather"

    class Echo(BaseModel):
        text: str

    parsed = await model.with_structured_output(Echo).ainvoke("structured")
    assert parsed == Echo(text="structured")
    assert state.requests[-1]["response_format"]["json_schema"]["name"] == "Echo"


@pytest.mark.integration
def test_sync_calls_over_a_real_openai_server(wire_server: tuple[str, WireState]) -> None:
    model = ChatBackendModel(backend=OpenAICompatBackend(wire_server[0], MODEL))
    assert model.invoke("one").content == "echo: one"
    pieces = [chunk.content for chunk in model.stream("two three four")]
    assert "".join(pieces) == "echo: two three four" and len([p for p in pieces if p]) == 4
    # abandoning a sync stream part-way closes it; the model keeps working
    for _chunk in model.stream("ENDLESS"):
        break
    assert model.invoke("five").content == "echo: five"


@pytest.mark.integration
async def test_one_backend_serves_sync_and_async_callers(
    wire_server: tuple[str, WireState],
) -> None:
    """The async caller's loop and the adapter's private loop each get their own pool."""
    model = ChatBackendModel(backend=OpenAICompatBackend(wire_server[0], MODEL))
    assert (await model.ainvoke("a")).content == "echo: a"
    assert model.invoke("b").content == "echo: b"  # sync, from inside a running loop
    assert (await model.ainvoke("c")).content == "echo: c"
    assert "".join(str(c.content) for c in model.stream("d e")) == "echo: d e"
    assert (await model.ainvoke("f")).content == "echo: f"
