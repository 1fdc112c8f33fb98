"""The ChatBackend seam: one small Protocol every LLM backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from llm_backend.types import ChatChunk, ChatMessage, ChatRequest, ChatResponse


@runtime_checkable
class ChatBackend(Protocol):
    """Something that answers chat requests: a remote server or an in-process engine.

    Implementations raise only the ``llm_backend.errors`` family.

    Example:
        >>> backend: ChatBackend = OpenAICompatBackend("http://127.0.0.1:8000/v1", "smollm2")
        >>> reply = await backend.chat(ChatRequest([ChatMessage.user("Hi")]))
        >>> async for chunk in backend.stream(ChatRequest([ChatMessage.user("Hi")])):
        ...     print(chunk.delta, end="")
    """

    name: str
    """A short label for logs and error messages, e.g. ``"openai-compat"``."""
    context_window: int
    """The model's context window in tokens (prompt plus output)."""

    async def chat(self, request: ChatRequest) -> ChatResponse:
        """Answer the request in one piece."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Answer the request in pieces (an async generator; ``aclose()`` cancels it)."""
        ...

    async def health(self) -> bool:
        """Whether the backend can answer now; never raises."""
        ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens these messages take as a prompt (approximate for remote backends)."""
        ...
