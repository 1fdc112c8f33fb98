"""fit_to_context drops old history first, then low-ranked sources, never the essentials."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from llm_backend import ChatMessage, ContextTooLong, ToolCall, fit_to_context
from llm_backend.context import approximate_token_count


def words(messages: Sequence[ChatMessage]) -> int:
    """One token per word: easy to reason about in assertions."""
    return sum(len((m.content or "").split()) for m in messages)


def conversation() -> list[ChatMessage]:
    return [
        ChatMessage.system("sys " * 10),  # 0: 10
        ChatMessage.user("old question " * 5),  # 1: 10  turn A
        ChatMessage.assistant(None, [ToolCall("c1", "search", "{}")]),  # 2: 0  turn A
        ChatMessage.tool("tool result " * 5, "c1"),  # 3: 10 turn A
        ChatMessage.assistant("old answer " * 5),  # 4: 10 turn A
        ChatMessage.user("mid question " * 5),  # 5: 10 turn B
        ChatMessage.assistant("mid answer " * 5),  # 6: 10 turn B
        ChatMessage.system("source one " * 10),  # 7: 20 retrieved, rank 1
        ChatMessage.system("source two " * 10),  # 8: 20 retrieved, rank 2
        ChatMessage.user("new question " * 5),  # 9: 10 current
    ]


def test_everything_kept_when_it_fits() -> None:
    messages = conversation()
    fitted = fit_to_context(
        messages, count_tokens=words, context_window=200, reserve_for_output=10, retrieved=[7, 8]
    )
    assert fitted.messages == messages and fitted.dropped == [] and fitted.prompt_tokens == 110


def test_oldest_turn_goes_first_with_its_tool_messages() -> None:
    messages = conversation()
    fitted = fit_to_context(
        messages, count_tokens=words, context_window=90, reserve_for_output=10, retrieved=[7, 8]
    )
    # turn A (indices 1-4, 30 tokens) dropped as a whole: no orphan tool result remains
    assert fitted.dropped == messages[1:5]
    assert fitted.messages == [messages[0], *messages[5:]]
    assert fitted.prompt_tokens == 80 and fitted.dropped_retrieved == []


def test_sources_dropped_lowest_rank_first_after_history() -> None:
    messages = conversation()
    fitted = fit_to_context(
        messages, count_tokens=words, context_window=50, reserve_for_output=10, retrieved=[7, 8]
    )
    assert fitted.messages == [messages[0], messages[7], messages[9]]
    assert fitted.dropped_retrieved == [8]
    assert fitted.prompt_tokens == 40


def test_protected_messages_survive() -> None:
    messages = conversation()
    fitted = fit_to_context(
        messages,
        count_tokens=words,
        context_window=70,
        reserve_for_output=10,
        retrieved=[7, 8],
        protected=[6],
    )
    assert messages[6] in fitted.messages and messages[5] not in fitted.messages
    assert fitted.messages[0] is messages[0] and fitted.messages[-1] is messages[9]


def test_impossible_budget_raises_context_too_long() -> None:
    messages = conversation()
    with pytest.raises(ContextTooLong) as info:
        fit_to_context(
            messages, count_tokens=words, context_window=25, reserve_for_output=10, retrieved=[7, 8]
        )
    assert info.value.limit == 25 and info.value.prompt_tokens == 30
    assert "25" in str(info.value)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="leaves no room"):
        fit_to_context(conversation(), count_tokens=words, context_window=10, reserve_for_output=10)
    with pytest.raises(ValueError, match="index 12 is out of range"):
        fit_to_context(
            conversation(),
            count_tokens=words,
            context_window=99,
            reserve_for_output=1,
            retrieved=[12],
        )


def test_approximate_count_grows_with_text_and_tool_calls() -> None:
    short = approximate_token_count([ChatMessage.user("abcd")])
    longer = approximate_token_count([ChatMessage.user("abcd" * 100)])
    with_call = approximate_token_count(
        [ChatMessage.assistant(None, [ToolCall("c", "search", '{"query": "' + "x" * 40 + '"}')])]
    )
    assert short == 5 and longer == 104 and with_call > 10
