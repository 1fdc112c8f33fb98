"""A ChatBackend over any OpenAI-compatible server: vLLM, our engine's server, others.

Uses the official ``openai`` async client with retries off and a short connect
timeout, so an absent server fails fast with ``BackendUnavailable`` instead of
hanging the request that needed it.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import re
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from llm_backend.context import approximate_token_count
from llm_backend.errors import BackendError, BackendUnavailable, BadRequest, ContextTooLong
from llm_backend.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    FinishReason,
    ToolCall,
    ToolSpec,
    Usage,
)

logger = logging.getLogger(__name__)

# vLLM and our engine: "This model's maximum context length is ..."; OpenAI:
# "context_length_exceeded"; llama.cpp: "exceeds the available context size".
_CONTEXT_PATTERNS = re.compile(
    r"context[ _]length|context[ _]window|maximum context|context size|too many tokens"
    r"|prompt is too long",
    re.IGNORECASE,
)
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
# Sampling fields the OpenAI API lacks; vLLM and our engine read them from the body.
_EXTRA_SAMPLING_FIELDS = ("top_k", "min_p", "repetition_penalty")
# The HTTP library under the openai client: httpx2 since openai 3, httpx before. Errors
# while iterating a stream (a read timeout, a dropped connection) surface unwrapped.
try:
    _HTTP_LIB = importlib.import_module("httpx2")
except ImportError:
    _HTTP_LIB = importlib.import_module("httpx")
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (_HTTP_LIB.HTTPError,)


def _normalise_base_url(base_url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is kept as is."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}"
        )
    path = parts.path or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def strict_tools(tools: Sequence[ToolSpec]) -> list[ToolSpec]:
    """Copies of ``tools`` with ``"strict": true`` on each function definition.

    Without it small models served by vLLM often answer a bare string as the
    arguments; strict mode makes the server constrain them to the schema.
    """
    out = []
    for tool in tools:
        tool_copy = copy.deepcopy(tool)
        tool_copy["function"].setdefault("strict", True)
        out.append(tool_copy)
    return out


@dataclass
class _ToolCallBuffer:
    """Argument fragments of one streamed tool call, joined as they arrive."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def to_tool_call(self, index: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{index}", name=self.name, arguments="".join(self.arguments)
        )


class OpenAICompatBackend:
    """ChatBackend over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Args:
        base_url: The server's API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1``
            is added when the URL has no path).
        model: The model name the server serves.
        api_key: Bearer token; local servers accept anything.
        connect_timeout: Seconds to wait for the TCP connection.
        read_timeout: Seconds to wait for each piece of the answer.
        context_window: The model's context window; ``health()`` replaces it with
            the server's ``max_model_len`` when the server reports one (vLLM does).

    Example:
        >>> backend = OpenAICompatBackend("http://127.0.0.1:8000/v1", "smollm2-135m")
        >>> request = ChatRequest([ChatMessage.user("Name a colour.")],
        ...                       sampling=SamplingOptions(temperature=0, max_tokens=16))
        >>> print((await backend.chat(request)).content)
        >>> async for chunk in backend.stream(request):
        ...     print(chunk.delta, end="")
    """

    name = "openai-compat"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        connect_timeout: float = 2.0,
        read_timeout: float = 120.0,
        context_window: int = 4096,
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError(
                f"timeouts must be > 0, got connect={connect_timeout}, read={read_timeout}"
            )
        if context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {context_window}")
        if not model:
            raise ValueError("model must be a non-empty model name")
        self.base_url = _normalise_base_url(base_url)
        self.model = model
        self.context_window = context_window
        self._api_key = api_key or "EMPTY"
        self._timeout = openai.Timeout(read_timeout, connect=connect_timeout)
        # One client per event loop: its connection pool belongs to the loop that opened
        # it, and the LangChain adapter's sync calls run on a loop of their own.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def _client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key, timeout=self._timeout, max_retries=0
            )
            self._clients[loop] = client
        return client

    # -- requests -----------------------------------------------------------------------------

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """Keyword arguments for ``chat.completions.create``."""
        sampling = request.sampling
        params: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [message.to_openai() for message in request.messages],
        }
        for key in (
            "temperature",
            "top_p",
            "max_tokens",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(sampling, key)
            if value is not None:
                params[key] = value
        extra_body = {
            key: getattr(sampling, key)
            for key in _EXTRA_SAMPLING_FIELDS
            if getattr(sampling, key) is not None
        }
        if extra_body:
            params["extra_body"] = extra_body
        if request.tools:
            params["tools"] = strict_tools(request.tools)
        if request.tool_choice is not None:
            params["tool_choice"] = request.tool_choice
        if request.response_format is not None:
            params["response_format"] = request.response_format
        if request.stop:
            params["stop"] = list(request.stop)
        return params

    def _translate(self, exc: openai.OpenAIError) -> BackendError:
        """The llm_backend error for an ``openai`` client error."""
        if isinstance(exc, openai.APITimeoutError):
            return BackendUnavailable(self.name, self.base_url, f"timed out ({self._timeout})")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return BackendUnavailable(self.name, self.base_url, f"cannot connect: {cause}")
        if isinstance(exc, openai.APIStatusError):
            detail = _error_detail(exc)
            status = exc.status_code
            if status in (400, 413, 422) and _CONTEXT_PATTERNS.search(detail):
                return ContextTooLong.from_server_message(detail, self.context_window)
            if status in (502, 503, 504):
                return BackendUnavailable(self.name, self.base_url, f"HTTP {status}: {detail}")
            if 400 <= status < 500:
                return BadRequest(
                    f"{self.name} at {self.base_url} refused the request (HTTP {status}): {detail}"
                )
            return BackendError(f"{self.name} at {self.base_url} failed (HTTP {status}): {detail}")
        return BackendError(f"{self.name} at {self.base_url} failed: {exc}")

    # -- ChatBackend ------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        params = self._params(request)
        try:
            completion = await self._client.chat.completions.create(**params)
        except openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        if not completion.choices:
            raise BackendError(f"{self.name} at {self.base_url} returned no choices")
        choice = completion.choices[0]
        message = choice.message
        tool_calls = [
            ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments or "")
            for call in message.tool_calls or []
            if getattr(call, "function", None) is not None
        ]
        return ChatResponse(
            content=message.content or "",
            tool_calls=tool_calls,
            finish_reason=_finish_reason(choice.finish_reason, bool(tool_calls)),
            usage=_usage(completion.usage),
            model=completion.model or params["model"],
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        params = self._params(request)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        try:
            response = await self._client.chat.completions.create(**params)
        except openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        buffers: dict[int, _ToolCallBuffer] = {}
        raw_finish: str | None = None
        usage: Usage | None = None
        try:
            async for event in response:
                if event.usage is not None:
                    usage = _usage(event.usage)
                for choice in event.choices:
                    delta = choice.delta
                    if delta.content:
                        yield ChatChunk(delta=delta.content)
                    for call_delta in delta.tool_calls or []:
                        buffer = buffers.setdefault(call_delta.index, _ToolCallBuffer())
                        if call_delta.id:
                            buffer.id = call_delta.id
                        function = call_delta.function
                        if function is not None:
                            if function.name:
                                buffer.name += function.name
                            if function.arguments:
                                buffer.arguments.append(function.arguments)
                    if choice.finish_reason:
                        raw_finish = choice.finish_reason
        except openai.OpenAIError as exc:
            raise self._translate(exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise BackendUnavailable(self.name, self.base_url, f"stream broke: {exc!r}") from exc
        finally:
            # Closes the HTTP response, so the server sees the client leave when the
            # consumer stops early (aclose on this generator runs this block).
            await response.close()
        tool_calls = [buffers[index].to_tool_call(index) for index in sorted(buffers)]
        if tool_calls:
            yield ChatChunk(tool_calls=tool_calls)
        yield ChatChunk(finish_reason=_finish_reason(raw_finish, bool(tool_calls)), usage=usage)

    async def health(self) -> bool:
        """Whether ``GET /models`` answers; also reads the server's ``max_model_len``."""
        try:
            page = await self._client.models.list()
        except openai.OpenAIError as exc:
            logger.info("%s at %s is not healthy: %s", self.name, self.base_url, exc)
            return False
        for entry in page.data:
            max_len = (entry.model_extra or {}).get("max_model_len")
            if entry.id == self.model and isinstance(max_len, int) and max_len > 0:
                self.context_window = max_len
        return True

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An estimate (about four characters a token); the server has the tokenizer."""
        return approximate_token_count(messages)

    async def aclose(self) -> None:
        """Close the HTTP connection pool of the running event loop."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return exc.message


def _finish_reason(raw: str | None, has_tool_calls: bool) -> FinishReason:
    if has_tool_calls and raw in (None, "stop", "tool_calls"):
        return "tool_calls"
    return _FINISH_REASONS.get(raw or "stop", "stop")


def _usage(raw: Any) -> Usage | None:
    if raw is None:
        return None
    return Usage(prompt_tokens=raw.prompt_tokens or 0, completion_tokens=raw.completion_tokens or 0)
