"""A LangChain chat model over any ChatBackend.

LangChain agents and chains (``create_agent``, LCEL pipelines) see one
``BaseChatModel`` whatever runs underneath: vLLM, our engine's server, our
engine in-process, or a scripted backend in tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import fields, replace
from operator import itemgetter
from typing import Any, Literal, TypeVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import ChatMessage as LCChatMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm_backend.protocol import ChatBackend
from llm_backend.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    SamplingOptions,
    ToolCall,
    ToolChoice,
    ToolSpec,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingOptions))
# Keyword arguments LangChain callers pass that have no meaning here: our OpenAI
# client always sends strict tools, and backends run tool calls in order.
_IGNORED_KWARGS = frozenset({"strict", "parallel_tool_calls"})
_REQUEST_KWARGS = frozenset({"tools", "tool_choice", "response_format", "model"})


class _LoopThread:
    """One private event loop in a daemon thread, for the sync LangChain entry points.

    Sync callers may already be inside a running loop (Jupyter, a FastAPI sync
    route run from a worker thread), where ``asyncio.run`` is not allowed; the
    backend's coroutines run here instead.
    """

    _lock = threading.Lock()
    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="ragloom-llm-backend-loop", daemon=True
        )
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the private loop and wait for its result."""
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "a sync ChatBackendModel call was made from inside its own event loop; "
                "use the async API (ainvoke, astream) there"
            )

        async def wrapper() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result()


def normalise_tool_choice(tool_choice: Any) -> ToolChoice | None:
    """LangChain's tool_choice spellings -> the OpenAI ones ChatRequest takes.

    ``"any"`` and ``True`` mean ``"required"``; a bare tool name, ``{"name": ...}``
    or an OpenAI ``{"type": "function", "function": {"name": ...}}`` force that tool.
    """
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True or tool_choice == "any":
        return "required"
    if tool_choice in ("auto", "none", "required"):
        return str(tool_choice)  # type: ignore[return-value]
    if isinstance(tool_choice, str) and tool_choice:
        return {"type": "function", "function": {"name": tool_choice}}
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
    raise ValueError(
        "tool_choice must be 'auto', 'none', 'required', 'any', a tool name or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
    )


def _text(content: Any, role: str) -> str:
    """A LangChain message's content as plain text (text blocks joined)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"only text content is supported, got a {kind!r} block in a {role} message"
            )
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages -> the seam's ``ChatMessage`` list."""
    out: list[ChatMessage] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            out.append(ChatMessage.system(_text(message.content, "system")))
        elif isinstance(message, HumanMessage):
            out.append(ChatMessage.user(_text(message.content, "user")))
        elif isinstance(message, AIMessage):
            calls = [
                ToolCall(
                    id=call.get("id") or f"call_{uuid.uuid4().hex[:12]}",
                    name=call["name"],
                    arguments=json.dumps(call.get("args") or {}),
                )
                for call in message.tool_calls
            ]
            text = _text(message.content, "assistant")
            out.append(ChatMessage.assistant(text or (None if calls else ""), calls))
        elif isinstance(message, ToolMessage):
            out.append(ChatMessage.tool(_text(message.content, "tool"), message.tool_call_id))
        elif isinstance(message, LCChatMessage) and message.role in ("system", "user", "assistant"):
            out.append(ChatMessage(message.role, _text(message.content, message.role)))  # type: ignore[arg-type]
        else:
            raise ValueError(f"cannot send a {type(message).__name__} to a chat backend")
    return out


def _lc_tool_calls(calls: Sequence[ToolCall]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tool_calls, invalid_tool_calls) in LangChain's shapes."""
    valid: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for call in calls:
        try:
            args = call.parsed_arguments()
        except ValueError as exc:
            invalid.append(
                {
                    "name": call.name,
                    "args": call.arguments,
                    "id": call.id,
                    "error": str(exc),
                    "type": "invalid_tool_call",
                }
            )
            continue
        valid.append({"name": call.name, "args": args, "id": call.id, "type": "tool_call"})
    return valid, invalid


def to_ai_message(response: ChatResponse, backend_name: str) -> AIMessage:
    """A backend's ``ChatResponse`` -> LangChain ``AIMessage``."""
    tool_calls, invalid = _lc_tool_calls(response.tool_calls)
    message = AIMessage(
        content=response.content,
        tool_calls=tool_calls,
        invalid_tool_calls=invalid,
        response_metadata={
            "finish_reason": response.finish_reason,
            "model_name": response.model,
            "model_provider": backend_name,
        },
    )
    if response.usage is not None:
        message.usage_metadata = {
            "input_tokens": response.usage.prompt_tokens,
            "output_tokens": response.usage.completion_tokens,
            "total_tokens": response.usage.total_tokens,
        }
    return message


class ChatBackendModel(BaseChatModel):
    """LangChain ``BaseChatModel`` over any ``ChatBackend``.

    Tool binding, tool_choice, ``response_format`` and sampling options become
    fields of the ``ChatRequest``; tool calls come back as ``AIMessage.tool_calls``
    and token counts as ``usage_metadata``. The sync entry points run the backend
    on a private event-loop thread.

    Args:
        backend: The ChatBackend to call.
        sampling: Default sampling options; per-call keyword arguments with the same
            names (``temperature=0``, ``max_tokens=64``...) override them.

    Example:
        >>> from langchain.agents import create_agent
        >>> model = ChatBackendModel(backend=OpenAICompatBackend(url, "smollm2-135m"),
        ...                          sampling=SamplingOptions(temperature=0))
        >>> agent = create_agent(model, tools=[search_tool])
        >>> agent.invoke({"messages": [("user", "What is our refund policy?")]})
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(description="The ChatBackend to call.")
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, backend: Any) -> Any:
        if not isinstance(backend, ChatBackend):
            raise TypeError(
                f"backend must implement llm_backend.ChatBackend, got {type(backend).__name__}"
            )
        return backend

    @property
    def _llm_type(self) -> str:
        return f"ragloom-{self.backend.name}"

    @property
    def model_name(self) -> str:
        return str(getattr(self.backend, "model", "") or self.backend.name)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"backend": self.backend.name, "model": self.model_name}

    def _resolve_model_profile(self) -> ModelProfile | None:
        return {"max_input_tokens": self.backend.context_window, "tool_calling": True}

    # -- request building ---------------------------------------------------------------------

    def _request(
        self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> ChatRequest:
        unknown = set(kwargs) - _SAMPLING_FIELDS - _REQUEST_KWARGS - _IGNORED_KWARGS - {"stop"}
        if unknown:
            raise ValueError(
                f"unsupported chat model arguments {sorted(unknown)}; accepted: "
                f"{sorted(_SAMPLING_FIELDS | _REQUEST_KWARGS | {'stop'})}"
            )
        overrides = {key: kwargs[key] for key in _SAMPLING_FIELDS & set(kwargs)}
        sampling = replace(self.sampling, **overrides) if overrides else self.sampling
        stop_strings = stop if stop is not None else kwargs.get("stop")
        tools: list[ToolSpec] | None = kwargs.get("tools") or None
        return ChatRequest(
            messages=to_chat_messages(messages),
            tools=tools,
            tool_choice=normalise_tool_choice(kwargs.get("tool_choice")) if tools else None,
            response_format=kwargs.get("response_format"),
            sampling=sampling,
            stop=list(stop_strings) if stop_strings else None,
            model=kwargs.get("model"),
        )

    # -- generation ---------------------------------------------------------------------------

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        response = await self.backend.chat(self._request(messages, stop, kwargs))
        message = to_ai_message(response, self.backend.name)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _chunks(self, request: ChatRequest) -> AsyncIterator[ChatGenerationChunk]:
        """The backend's stream as LangChain chunks (no callbacks)."""
        next_index = 0
        stream: AsyncIterator[ChatChunk] = self.backend.stream(request)
        try:
            async for chunk in stream:
                yield self._to_generation_chunk(chunk, next_index)
                next_index += len(chunk.tool_calls)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _to_generation_chunk(self, chunk: ChatChunk, first_index: int) -> ChatGenerationChunk:
        tool_call_chunks = [
            tool_call_chunk(
                name=call.name, args=call.arguments, id=call.id, index=first_index + offset
            )
            for offset, call in enumerate(chunk.tool_calls)
        ]
        extra: dict[str, Any] = {}
        if chunk.finish_reason is not None:
            extra["response_metadata"] = {
                "finish_reason": chunk.finish_reason,
                "model_name": self.model_name,
                "model_provider": self.backend.name,
            }
            extra["chunk_position"] = "last"
        if chunk.usage is not None:
            extra["usage_metadata"] = {
                "input_tokens": chunk.usage.prompt_tokens,
                "output_tokens": chunk.usage.completion_tokens,
                "total_tokens": chunk.usage.total_tokens,
            }
        message = AIMessageChunk(content=chunk.delta, tool_call_chunks=tool_call_chunks, **extra)
        return ChatGenerationChunk(message=message)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for generation in self._chunks(self._request(messages, stop, kwargs)):
            if run_manager is not None and generation.text:
                await run_manager.on_llm_new_token(generation.text, chunk=generation)
            yield generation

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        response = _LoopThread.get().run(self.backend.chat(request))
        message = to_ai_message(response, self.backend.name)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        loop = _LoopThread.get()
        chunks = self._chunks(request)
        try:
            while True:
                try:
                    generation: ChatGenerationChunk = loop.run(anext(chunks))
                except StopAsyncIteration:
                    return
                if run_manager is not None and generation.text:
                    run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        finally:
            loop.run(chunks.aclose())  # type: ignore[attr-defined]

    # -- tools and structured output -------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Bind tools (LangChain tools, pydantic models, functions or OpenAI dicts).

        Args:
            tools: The tools the model may call.
            tool_choice: ``"auto"``, ``"none"``, ``"required"``/``"any"``, or a tool name.
            **kwargs: Further request fields (``response_format``, sampling options).
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        choice = normalise_tool_choice(tool_choice)
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            names = [tool["function"]["name"] for tool in formatted]
            if name not in names:
                raise ValueError(f"tool_choice names {name!r}, not one of the bound tools {names}")
        if choice is not None:
            kwargs["tool_choice"] = choice
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        **kwargs: Any,
    ) -> Runnable[Any, dict[str, Any] | BaseModel]:
        """Answers parsed into ``schema`` (a pydantic class, TypedDict or JSON schema).

        ``json_schema`` (default) sends ``response_format`` with the schema, which
        vLLM and our engine enforce by constrained decoding; ``function_calling``
        forces a tool call instead; ``json_mode`` asks only for a JSON object.
        """
        if kwargs:
            raise ValueError(f"unsupported with_structured_output arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        function = _schema_function(schema)
        name = function["name"]
        llm: Runnable[Any, Any]
        parser: Runnable[Any, Any]
        if method == "function_calling":
            llm = self.bind_tools([schema], tool_choice=name)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                response_format: dict[str, Any] = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": function["parameters"], "strict": True},
                }
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format)
            if is_pydantic:
                parser = PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
            else:
                parser = JsonOutputParser()
        else:
            raise ValueError(
                f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}"
            )
        if not include_raw:
            return llm | parser
        parser_with_fallback = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        ).with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=llm) | parser_with_fallback


def _schema_function(schema: dict[str, Any] | type) -> dict[str, Any]:
    """``{"name", "description", "parameters"}`` for a structured-output schema."""
    if isinstance(schema, dict) and "function" not in schema and "title" not in schema:
        if schema.get("type") != "object":
            raise ValueError(
                "a JSON schema for structured output must be an object schema with a 'title', "
                f"got {json.dumps(schema)[:200]}"
            )
        return {"name": "output", "description": "", "parameters": schema}
    function: dict[str, Any] = convert_to_openai_tool(schema)["function"]
    function.setdefault("parameters", {"type": "object", "properties": {}})
    return function
