"""A deterministic ChatBackend that plays back scripted answers.

For unit tests of the layers above (agents, the API): no model, no network,
every request recorded. It is a fake for those layers' tests, never a stand-in
for testing a real backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from llm_backend.context import approximate_token_count
from llm_backend.errors import BackendError, ContextTooLong
from llm_backend.types import ChatChunk, ChatMessage, ChatRequest, ChatResponse, Usage

ScriptStep = ChatResponse | Callable[[ChatRequest], ChatResponse]


class ScriptedBackend:
    """Answers each request with the next scripted response.

    Args:
        responses: One entry per expected call: a ``ChatResponse``, or a function
            of the request returning one.
        context_window: Requests whose (approximate) prompt tokens exceed this fail
            with ``ContextTooLong``, as a real backend would.
        healthy: What ``health()`` reports.
        chunk_size: Characters per streamed content chunk.

    Attributes:
        requests: Every request received, in order.

    Example:
        >>> backend = ScriptedBackend([
        ...     ChatResponse("", [ToolCall("c1", "search", '{"query": "refunds"}')], "tool_calls"),
        ...     ChatResponse("Refunds take 5 days [1]."),
        ... ])
        >>> agent = build_agent(backend)               # the layer under test
        >>> assert backend.requests[1].messages[-1].role == "tool"
    """

    name = "scripted"

    def __init__(
        self,
        responses: Sequence[ScriptStep],
        *,
        context_window: int = 8192,
        healthy: bool = True,
        chunk_size: int = 1,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._script = list(responses)
        self._position = 0
        self.context_window = context_window
        self.healthy = healthy
        self.chunk_size = chunk_size
        self.requests: list[ChatRequest] = []

    @property
    def remaining(self) -> int:
        """Scripted responses not yet used."""
        return len(self._script) - self._position

    def _next(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        prompt_tokens = self.count_tokens(request.messages)
        if prompt_tokens > self.context_window:
            raise ContextTooLong(prompt_tokens, self.context_window)
        if self._position >= len(self._script):
            raise BackendError(
                f"scripted backend ran out of responses: call {len(self.requests)} but only "
                f"{len(self._script)} scripted"
            )
        step = self._script[self._position]
        self._position += 1
        response = step(request) if callable(step) else step
        if not isinstance(response, ChatResponse):
            raise BackendError(
                f"scripted step returned {type(response).__name__}, not ChatResponse"
            )
        if response.usage is None:
            completion = approximate_token_count([response.to_message()])
            response = ChatResponse(
                content=response.content,
                tool_calls=list(response.tool_calls),
                finish_reason=response.finish_reason,
                usage=Usage(prompt_tokens, completion),
                model=response.model or self.name,
            )
        return response

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return self._next(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        response = self._next(request)
        content = response.content
        for start in range(0, len(content), self.chunk_size):
            yield ChatChunk(delta=content[start : start + self.chunk_size])
        if response.tool_calls:
            yield ChatChunk(tool_calls=list(response.tool_calls))
        yield ChatChunk(finish_reason=response.finish_reason, usage=response.usage)

    async def health(self) -> bool:
        return self.healthy

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return approximate_token_count(messages)
