"""Fitting a conversation into a model's context window.

``fit_to_context`` drops what matters least until the prompt fits: the oldest
history turns first, then retrieved-context messages (lowest-ranked first). It
never drops the leading system prompt, the latest user message, or messages the
caller marks as protected.

Example:
    >>> fitted = fit_to_context(
    ...     messages, count_tokens=backend.count_tokens,
    ...     context_window=backend.context_window, reserve_for_output=256,
    ...     retrieved=[1, 2, 3])          # indices of source messages, best first
    >>> reply = await backend.chat(ChatRequest(fitted.messages))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from llm_backend.errors import ContextTooLong
from llm_backend.types import ChatMessage

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""Rough characters per token for English text with BPE tokenizers."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds per message (role markers, separators)."""


def approximate_token_count(messages: Sequence[ChatMessage]) -> int:
    """An estimate of the prompt tokens, for backends without a local tokenizer.

    About four characters a token plus a few template tokens per message; tool
    calls count their name and arguments.
    """
    total = 0
    for message in messages:
        chars = len(message.content or "")
        for call in message.tool_calls or []:
            chars += len(call.name) + len(call.arguments)
        total += MESSAGE_OVERHEAD_TOKENS + (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    return total


@dataclass(frozen=True)
class FittedMessages:
    """The result of ``fit_to_context``.

    Args:
        messages: What to send, in the original order.
        dropped: What was left out, in the original order.
        dropped_retrieved: Indices (into the input list) of dropped retrieved-context messages.
        prompt_tokens: ``count_tokens(messages)``.
    """

    messages: list[ChatMessage]
    dropped: list[ChatMessage]
    dropped_retrieved: list[int]
    prompt_tokens: int


def fit_to_context(
    messages: Sequence[ChatMessage],
    *,
    count_tokens: Callable[[Sequence[ChatMessage]], int],
    context_window: int,
    reserve_for_output: int,
    retrieved: Sequence[int] = (),
    protected: Collection[int] = (),
) -> FittedMessages:
    """Drop messages until ``count_tokens(kept) + reserve_for_output <= context_window``.

    Order of dropping:

    1. History turns, oldest first. A turn is a user message with everything up
       to the next user message (assistant replies, tool calls and their
       results), so a tool result is never kept without the call it answers.
    2. Retrieved-context messages, from the end of ``retrieved`` (callers list
       them best first, so the lowest-ranked source goes first).

    Never dropped: system messages before the first non-system message, the
    latest user message and everything after it (the turn being answered), and
    the indices in ``protected``.

    Args:
        messages: The full prompt.
        count_tokens: The backend's token counter (``ChatBackend.count_tokens``).
        context_window: The model's context window in tokens.
        reserve_for_output: Tokens to keep free for the answer.
        retrieved: Indices of messages holding retrieved context, best first.
        protected: Indices of further messages that must stay.

    Raises:
        ValueError: An index is out of range, or the budget is not positive.
        ContextTooLong: Even with everything droppable dropped, the prompt does not fit.
    """
    if reserve_for_output < 0:
        raise ValueError(f"reserve_for_output must be >= 0, got {reserve_for_output}")
    budget = context_window - reserve_for_output
    if budget <= 0:
        raise ValueError(
            f"reserve_for_output ({reserve_for_output}) leaves no room in a context window "
            f"of {context_window} tokens"
        )
    for index in (*retrieved, *protected):
        if not 0 <= index < len(messages):
            raise ValueError(f"message index {index} is out of range for {len(messages)} messages")

    keep = [True] * len(messages)
    fixed = _fixed_indices(messages, protected)
    retrieved_set = set(retrieved)

    def kept() -> list[ChatMessage]:
        return [message for message, flag in zip(messages, keep, strict=True) if flag]

    tokens = count_tokens(kept())
    dropped_retrieved: list[int] = []
    if tokens > budget:
        for turn in _history_turns(messages, fixed | retrieved_set):
            for index in turn:
                keep[index] = False
            tokens = count_tokens(kept())
            if tokens <= budget:
                break
    if tokens > budget:
        for index in reversed(list(retrieved)):
            if index in fixed or not keep[index]:
                continue
            keep[index] = False
            dropped_retrieved.append(index)
            tokens = count_tokens(kept())
            if tokens <= budget:
                break
    if tokens > budget:
        raise ContextTooLong(
            tokens + reserve_for_output,
            context_window,
            f"{tokens} prompt tokens after dropping all history and retrieved context, "
            f"plus {reserve_for_output} reserved for the answer",
        )
    dropped = [message for message, flag in zip(messages, keep, strict=True) if not flag]
    if dropped:
        logger.info(
            "dropped %d of %d messages (%d retrieved) to fit %d tokens into %d",
            len(dropped),
            len(messages),
            len(dropped_retrieved),
            tokens,
            budget,
        )
    return FittedMessages(
        messages=kept(),
        dropped=dropped,
        dropped_retrieved=sorted(dropped_retrieved),
        prompt_tokens=tokens,
    )


def _fixed_indices(messages: Sequence[ChatMessage], protected: Collection[int]) -> set[int]:
    """Indices that are never dropped: leading system messages, the current turn, ``protected``."""
    fixed = set(protected)
    for index, message in enumerate(messages):
        if message.role != "system":
            break
        fixed.add(index)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is not None:
        fixed.update(range(last_user, len(messages)))
    return fixed


def _history_turns(messages: Sequence[ChatMessage], skip: set[int]) -> list[list[int]]:
    """Droppable history, grouped into turns (oldest first), leaving out ``skip``."""
    turns: list[list[int]] = []
    current: list[int] = []
    for index, message in enumerate(messages):
        if index in skip:
            continue
        if message.role == "user" and current:
            turns.append(current)
            current = []
        current.append(index)
    if current:
        turns.append(current)
    return turns
