"""Chat turns: RAG, agent or plain LLM, as one stream of events.

``ChatService.events`` yields the agents package's events (``TokenEvent``,
``ToolCallEvent``, ``ToolResultEvent``, ``CitationsEvent``) and ends with a
``TurnResult``; routes turn them into SSE (``/api/chat``) or OpenAI chunks
(``/v1/chat/completions``). Backend and retrieval failures become ``ApiError``s
with a status naming the cause.

Example:
    >>> turn = ChatTurn(tenant="acme", mode="rag", question="refunds?", collection="docs")
    >>> async for event in service.events(turn):
    ...     if isinstance(event, TokenEvent): print(event.text, end="")
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from agents import (
    AgentProfile,
    AgentResult,
    Citation,
    CitationsEvent,
    DoneEvent,
    RagAnswer,
    RagAnswerer,
    RagConfig,
    TokenEvent,
    ToolAgent,
    ToolCallEvent,
    ToolResultEvent,
    default_registry,
)
from app.errors import ApiError
from app.services.collections import CollectionService
from app.settings import Settings
from llm_backend import (
    BackendError,
    BackendUnavailable,
    BadRequest,
    ChatBackend,
    ChatMessage,
    ChatRequest,
    ContextTooLong,
    SamplingOptions,
    ToolCall,
    Usage,
)
from retrieval import CollectionNotFound, RetrievalError

logger = logging.getLogger(__name__)

Mode = Literal["rag", "agent", "llm"]
ChatEvent = TokenEvent | ToolCallEvent | ToolResultEvent | CitationsEvent


@dataclass(slots=True)
class ChatTurn:
    """One question to answer.

    Attributes:
        tenant: Whose collection to search.
        mode: ``rag`` | ``agent`` | ``llm``.
        question: The user's message.
        collection: The tenant's collection (required for ``rag``; optional for ``agent``).
        history: Earlier turns, oldest first.
        sampling: Sampling options as requested (unset fields get the server's
            defaults, see ``ChatService.sampling_for``).
        stop: Stop strings (``llm`` mode).
        k: Chunks to retrieve (default: settings).
    """

    tenant: str
    mode: Mode
    question: str
    collection: str | None = None
    history: Sequence[ChatMessage] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] | None = None
    k: int | None = None


@dataclass(slots=True)
class TurnResult:
    """The end of a turn: everything the non-streaming answer and ``done`` carry."""

    answer: str
    citations: list[Citation]
    tool_calls: list[dict[str, Any]]
    usage: Usage | None
    timings: dict[str, float | None]
    refused: bool = False
    finish_reason: str | None = None

    def citations_json(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.citations]

    def usage_json(self) -> dict[str, int] | None:
        if self.usage is None:
            return None
        return {
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "total_tokens": self.usage.total_tokens,
        }


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingOptions))


def sampling_options(values: Mapping[str, Any], *, param: str | None = None) -> SamplingOptions:
    """``SamplingOptions`` from a request body's fields of the same names (others ignored).

    Raises:
        ApiError: 422 for a value the options reject (the schemas' bounds catch most first).
    """
    try:
        return SamplingOptions(**{name: values[name] for name in SAMPLING_FIELDS if name in values})
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid_request", param=param) from exc


def api_error_of(exc: Exception) -> ApiError:
    """The HTTP error for a failure of the backend or the retriever."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackendUnavailable):
        return ApiError(503, str(exc), "backend_unavailable")
    if isinstance(exc, ContextTooLong):
        return ApiError(400, str(exc), "context_length_exceeded")
    if isinstance(exc, BadRequest):
        return ApiError(400, f"the LLM backend refused the request: {exc}", "backend_bad_request")
    if isinstance(exc, BackendError):
        return ApiError(502, f"the LLM backend failed: {exc}", "backend_error")
    if isinstance(exc, CollectionNotFound):
        return ApiError(404, "collection not found", "collection_not_found")
    if isinstance(exc, RetrievalError):
        return ApiError(500, f"retrieval failed: {type(exc).__name__}", "retrieval_error")
    if isinstance(exc, TimeoutError):
        return ApiError(504, "the request timed out", "timeout")
    if isinstance(exc, ValueError):
        return ApiError(422, str(exc), "invalid_request")
    raise exc


class ChatService:
    """Answers chat turns over a backend and the tenant's collections.

    Args:
        settings: Agent defaults (k, thresholds, limits) and the agent's tool allow-list.
        backend: The LLM backend (None when it could not be built; turns then get 503).
        collections: The tenant-aware collection service.
        backend_problem: Why ``backend`` is None, for the 503 message.
    """

    def __init__(
        self,
        settings: Settings,
        backend: ChatBackend | None,
        collections: CollectionService,
        backend_problem: str | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.collections = collections
        self.backend_problem = backend_problem

    def require_backend(self) -> ChatBackend:
        """The backend, or a 503 naming why there is none."""
        if self.backend is None:
            raise ApiError(
                503,
                f"no LLM backend: {self.backend_problem or 'not configured'}",
                "backend_unavailable",
            )
        return self.backend

    def check(self, turn: ChatTurn) -> None:
        """Validate a turn before anything streams (404 for another tenant's collection)."""
        limit = self.settings.api.max_message_chars
        if len(turn.question) > limit:
            raise ApiError(
                413,
                f"message of {len(turn.question)} characters exceeds the limit of {limit}",
                "message_too_long",
                param="message",
            )
        if not turn.question.strip():
            raise ApiError(422, "message is empty", "invalid_request", param="message")
        if turn.mode == "rag" and turn.collection is None:
            raise ApiError(
                422, "mode 'rag' needs a collection", "collection_required", param="collection"
            )
        if turn.collection is not None:
            self.collections.record(turn.tenant, turn.collection)
        self.require_backend()

    async def events(self, turn: ChatTurn) -> AsyncIterator[ChatEvent | TurnResult]:
        """Answer ``turn``: content and tool events, citations, then one ``TurnResult``.

        Raises:
            ApiError: the backend or the retriever failed (mapped by ``api_error_of``).
        """
        backend = self.require_backend()
        try:
            if turn.mode == "llm":
                async for item in self._llm(backend, turn):
                    yield item
                return
            source = self._rag(backend, turn) if turn.mode == "rag" else self._agent(backend, turn)
            async for event in source:
                if isinstance(event, DoneEvent):
                    result = _result_of(event.answer)
                    if turn.mode == "agent":
                        yield CitationsEvent(result.citations)
                    yield result
                else:
                    yield event
        except (BackendError, RetrievalError, ValueError, TimeoutError) as exc:
            raise api_error_of(exc) from exc

    def sampling_for(
        self, requested: SamplingOptions, *, max_tokens: int | None = None
    ) -> SamplingOptions:
        """``requested`` with the server's defaults in the fields it leaves unset.

        ``repetition_penalty`` defaults to ``settings.agent.repetition_penalty``
        (None there sends none); ``max_tokens`` to the given budget (None keeps the
        backend's). Other unset fields stay unset: the backend's defaults apply
        (the RAG answer's temperature is 0 unless set, see ``RagConfig``).
        """
        penalty = requested.repetition_penalty
        return replace(
            requested,
            max_tokens=requested.max_tokens or max_tokens,
            repetition_penalty=self.settings.agent.repetition_penalty
            if penalty is None
            else penalty,
        )

    def _sampling(self, turn: ChatTurn) -> SamplingOptions:
        """The one sampling of a turn, whatever its mode (answer budget: the settings')."""
        return self.sampling_for(turn.sampling, max_tokens=self.settings.agent.max_answer_tokens)

    def _rag(self, backend: ChatBackend, turn: ChatTurn) -> AsyncIterator[Any]:
        assert turn.collection is not None
        agent = self.settings.agent
        k = turn.k or agent.k
        sampling = self._sampling(turn)
        assert sampling.max_tokens is not None
        retriever = self.collections.retriever(turn.tenant, turn.collection, k)
        config = RagConfig(
            k=k,
            min_score=agent.min_score,
            on_low_score=agent.on_low_score,
            max_answer_tokens=sampling.max_tokens,
            sampling=sampling,
        )
        return RagAnswerer(retriever, backend, config).stream(turn.question, turn.history)

    def _agent(self, backend: ChatBackend, turn: ChatTurn) -> AsyncIterator[Any]:
        from llm_backend import ChatBackendModel

        agent = self.settings.agent
        k = turn.k or agent.k
        retriever = None
        tools = list(self.settings.api.agent_tools)
        if turn.collection is not None:
            retriever = self.collections.retriever(turn.tenant, turn.collection, k)
        else:
            tools = [t for t in tools if t != "knowledge_base_search"]
        registry = default_registry(retriever, web_timeout_s=agent.web_timeout_s)
        profile = AgentProfile(
            name="api",
            tools=tools,
            max_steps=agent.max_steps,
            tool_timeout_s=agent.tool_timeout_s,
            max_tool_output_chars=agent.max_tool_output_chars,
            require_tool_first=retriever is not None,
        )
        model = ChatBackendModel(backend=backend, sampling=self._sampling(turn))
        return ToolAgent(model, registry, profile).stream(turn.question, turn.history)

    async def _llm(
        self, backend: ChatBackend, turn: ChatTurn
    ) -> AsyncIterator[ChatEvent | TurnResult]:
        started = time.perf_counter()
        sampling = self._sampling(turn)
        messages = [*turn.history, ChatMessage.user(turn.question)]
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        ttft: float | None = None
        request = ChatRequest(messages, sampling=sampling, stop=turn.stop)
        async for chunk in backend.stream(request):
            if chunk.delta:
                if ttft is None:
                    ttft = (time.perf_counter() - started) * 1000.0
                parts.append(chunk.delta)
                yield TokenEvent(chunk.delta)
            usage = chunk.usage or usage
            finish = chunk.finish_reason or finish
        yield CitationsEvent([])
        total = (time.perf_counter() - started) * 1000.0
        yield TurnResult(
            "".join(parts), [], [], usage, {"ttft_ms": ttft, "total_ms": total}, False, finish
        )


def _result_of(answer: RagAnswer | AgentResult) -> TurnResult:
    if isinstance(answer, RagAnswer):
        return TurnResult(
            answer=answer.answer,
            citations=list(answer.citations),
            tool_calls=[],
            usage=answer.usage,
            timings=dict(asdict(answer.timings)),
            refused=answer.refused,
            finish_reason=answer.finish_reason,
        )
    return TurnResult(
        answer=answer.answer,
        citations=list(answer.citations),
        tool_calls=[
            {
                "id": t.id,
                "name": t.name,
                "arguments": t.arguments,
                "result": t.result,
                "error": t.error,
            }
            for t in answer.tool_calls
        ],
        usage=None,
        timings={"total_ms": answer.total_ms, "steps": float(answer.steps)},
        refused=False,
        finish_reason="length" if answer.stopped_by_limit else "stop",
    )


def tool_call_of(raw: dict[str, Any]) -> ToolCall:
    """A ``ToolCall`` from an OpenAI wire dict (assistant message history).

    Raises:
        ValueError: the dict is not a function call.
    """
    function = raw.get("function") or {}
    if not isinstance(function, dict) or not function.get("name"):
        raise ValueError(f"tool call without a function name: {raw!r}")
    arguments = function.get("arguments") or "{}"
    if not isinstance(arguments, str):
        raise ValueError(f"tool call arguments must be a JSON string, got {arguments!r}")
    return ToolCall(str(raw.get("id") or ""), str(function["name"]), arguments)
