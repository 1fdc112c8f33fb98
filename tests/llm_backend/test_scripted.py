"""ScriptedBackend: deterministic playback that records what it was asked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llm_backend import (
    BackendError,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    ContextTooLong,
    ScriptedBackend,
    ToolCall,
)


async def test_plays_the_script_in_order_and_records_requests() -> None:
    backend = ScriptedBackend(
        [
            ChatResponse("", [ToolCall("c1", "search", "{}")], "tool_calls"),
            lambda request: ChatResponse(f"{len(request.messages)} messages seen"),
        ]
    )
    first = await backend.chat(ChatRequest([ChatMessage.user("a")]))
    second = await backend.chat(ChatRequest([ChatMessage.user("a"), ChatMessage.user("b")]))
    assert first.tool_calls[0].name == "search" and second.content == "2 messages seen"
    assert [len(r.messages) for r in backend.requests] == [1, 2]
    assert first.usage is not None and first.usage.prompt_tokens > 0
    with pytest.raises(BackendError, match="ran out of responses: call 3 but only 2 scripted"):
        await backend.chat(ChatRequest([ChatMessage.user("c")]))


async def test_streams_in_chunks_then_tool_calls_then_finish() -> None:
    backend = ScriptedBackend(
        [ChatResponse("abcdefg", [ToolCall("c", "t", "{}")], "tool_calls")], chunk_size=3
    )
    chunks = [c async for c in backend.stream(ChatRequest([ChatMessage.user("x")]))]
    assert [c.delta for c in chunks] == ["abc", "def", "g", "", ""]
    assert chunks[3].tool_calls == [ToolCall("c", "t", "{}")]
    assert chunks[4].finish_reason == "tool_calls" and chunks[4].usage is not None


async def test_refuses_prompts_over_its_context_window() -> None:
    backend = ScriptedBackend([ChatResponse("never")], context_window=10)
    with pytest.raises(ContextTooLong) as info:
        await backend.chat(ChatRequest([ChatMessage.user("word " * 100)]))
    assert info.value.limit == 10 and info.value.prompt_tokens is not None
    assert backend.remaining == 1


async def test_health_reports_what_it_was_told() -> None:
    assert await ScriptedBackend([], healthy=False).health() is False


def test_importing_the_package_is_light() -> None:
    code = (
        "import sys, llm_backend; "
        "mods = ('torch', 'openai', 'langchain_core', 'transformers'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
