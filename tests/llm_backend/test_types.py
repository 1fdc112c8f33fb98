"""The seam's data types validate their inputs with clear messages."""

from __future__ import annotations

import pytest

from llm_backend import ChatMessage, ChatRequest, ChatResponse, SamplingOptions, ToolCall

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


def test_message_round_trips_to_openai_shape() -> None:
    call = ToolCall("c1", "search", '{"query": "x"}')
    message = ChatMessage.assistant(None, [call])
    assert message.to_openai() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "search", "arguments": '{"query": "x"}'},
            }
        ],
    }
    assert ChatMessage.tool("42", "c1").to_openai() == {
        "role": "tool",
        "content": "42",
        "tool_call_id": "c1",
    }


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: ChatMessage("robot", "hi"), "role must be one of"),  # type: ignore[arg-type]
        (lambda: ChatMessage("tool", "x"), "tool_call_id"),
        (lambda: ChatMessage("user", "x", tool_calls=[ToolCall("a", "b", "{}")]), "only assistant"),
        (lambda: SamplingOptions(temperature=-1), "temperature must be >= 0, got -1"),
        (lambda: SamplingOptions(top_p=0), "top_p must be in (0, 1], got 0"),
        (lambda: SamplingOptions(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (lambda: ChatRequest([]), "at least one message"),
        (lambda: ChatRequest([ChatMessage.user("x")], tool_choice="any"), "tool_choice must be"),
        (lambda: ChatRequest([ChatMessage.user("x")], tool_choice="required"), "no tools"),
        (
            lambda: ChatRequest(
                [ChatMessage.user("x")],
                tools=[SEARCH_TOOL],
                tool_choice={"type": "function", "function": {"name": "calc"}},
            ),
            "'calc', which is not among the tools",
        ),
        (
            lambda: ChatRequest([ChatMessage.user("x")], tools=[{"name": "x"}]),
            "OpenAI function tool",
        ),
        (lambda: ChatResponse("x", finish_reason="eos"), "finish_reason must be"),  # type: ignore[arg-type]
    ],
)
def test_bad_values_are_refused_with_the_value_named(build, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert fragment in str(info.value)


def test_tool_call_arguments_parse_or_explain() -> None:
    assert ToolCall("c", "search", '{"query": "q"}').parsed_arguments() == {"query": "q"}
    assert ToolCall("c", "search", "").parsed_arguments() == {}
    with pytest.raises(ValueError, match="not a JSON object"):
        ToolCall("c", "search", '"just a string"').parsed_arguments()
    with pytest.raises(ValueError, match="not JSON"):
        ToolCall("c", "search", "{query:").parsed_arguments()


def test_response_becomes_the_assistant_message() -> None:
    call = ToolCall("c1", "search", "{}")
    message = ChatResponse("", [call], "tool_calls").to_message()
    assert message.role == "assistant" and message.content is None and message.tool_calls == [call]
