"""A ChatBackend over our engine running in this process (no HTTP).

Requests go through the same preparation as the engine's OpenAI server
(``llm_backend.engine.server.prepare_chat``: chat template, tools in the system
prompt, llguidance grammars for tool calls and ``response_format``, context
checks), then straight into the ``AsyncEngine``'s continuous-batching scheduler.
So a request answered here and over HTTP by ``ragloom engine serve`` is the same
request to the model.

Importing this module imports torch (through the engine).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from llm_backend.engine.async_engine import AsyncEngine, RequestStream
from llm_backend.engine.errors import EngineError
from llm_backend.engine.loader import load_model
from llm_backend.engine.protocol import APIError, ChatCompletionRequest
from llm_backend.engine.scheduler import EngineOverloaded, RequestOutput, SchedulerConfig
from llm_backend.engine.server import prepare_chat
from llm_backend.engine.structured import TOOL_CALL_OPEN, format_tool_call, parse_tool_calls
from llm_backend.errors import BackendError, BackendUnavailable, BadRequest, ContextTooLong
from llm_backend.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    FinishReason,
    ToolCall,
    Usage,
)

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class LocalEngineBackend:
    """ChatBackend over an in-process ``AsyncEngine`` (our engine, CPU).

    Args:
        engine: A started ``AsyncEngine``. The backend does not stop an engine it was
            given; ``from_model_path`` makes one it owns and ``close()`` stops.

    Example:
        >>> backend = LocalEngineBackend.from_model_path(gguf_path, model_name="smollm2-135m")
        >>> request = ChatRequest([ChatMessage.user("Name a colour.")],
        ...                       sampling=SamplingOptions(temperature=0, max_tokens=16))
        >>> print((await backend.chat(request)).content)
        >>> backend.close()
    """

    name = "local-engine"

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.model: str = engine.model_name
        self.context_window: int = int(engine.max_seq_len)
        self._owns_engine = owns_engine

    @classmethod
    def from_model_path(
        cls,
        path: str | Path,
        *,
        model_name: str = "model",
        quant: str = "auto",
        max_batch: int = 8,
        max_seq_len: int = 4096,
        max_waiting: int | None = None,
        compile_decode: bool | Literal["background"] = False,
    ) -> LocalEngineBackend:
        """Load a GGUF file, start an engine on it, and wrap it (``close()`` stops it).

        Raises:
            BackendUnavailable: The model file is missing or cannot be loaded.
        """
        try:
            loaded = load_model(
                path,
                quant=quant,
                max_batch=max_batch,
                max_seq_len=max_seq_len,
                compile_decode=compile_decode,
            )
        except EngineError as exc:
            raise BackendUnavailable(cls.name, str(path), str(exc)) from exc
        config = SchedulerConfig(max_running=max_batch)
        if max_waiting is not None:
            config.max_waiting = max_waiting
        engine = AsyncEngine(loaded, model_name=model_name, config=config).start()
        return cls(engine, owns_engine=True)

    def close(self) -> None:
        """Stop the engine if this backend started it."""
        if self._owns_engine:
            self.engine.stop()

    # -- requests -----------------------------------------------------------------------------

    def _wire_request(self, request: ChatRequest) -> ChatCompletionRequest:
        """The request in the engine server's schema (the same validation as over HTTP)."""
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [message.to_openai() for message in request.messages],
        }
        for key in _SAMPLING_KEYS:
            value = getattr(request.sampling, key)
            if value is not None:
                body[key] = value
        if request.tools:
            body["tools"] = request.tools
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.response_format is not None:
            body["response_format"] = request.response_format
        if request.stop:
            body["stop"] = list(request.stop)
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            raise BadRequest(f"{self.name}: {where}: {first.get('msg', 'invalid value')}") from exc

    def _translate(self, exc: APIError | EngineError) -> BackendError:
        if isinstance(exc, APIError):
            if exc.code == "context_length_exceeded":
                return ContextTooLong.from_server_message(exc.message, self.context_window)
            if exc.status_code >= 500:
                return BackendUnavailable(self.name, self.model, exc.message)
            return BadRequest(f"{self.name} refused the request: {exc.message}")
        if isinstance(exc, EngineOverloaded):
            return BackendUnavailable(self.name, self.model, str(exc))
        if not self.engine.is_alive:
            return BackendUnavailable(self.name, self.model, f"engine not running: {exc}")
        return BadRequest(f"{self.name} refused the request: {exc}")

    def _submit(self, request: ChatRequest) -> tuple[RequestStream, bool]:
        """Prepare and submit; returns the output stream and whether tools are active."""
        wire = self._wire_request(request)
        try:
            prepared = prepare_chat(self.engine, wire)
            stream = self.engine.submit(
                prepared.prompt_ids,
                prepared.params,
                grammar=prepared.grammar,
                ignore_eos=prepared.ignore_eos,
            )
        except (APIError, EngineError) as exc:
            raise self._translate(exc) from exc
        return stream, prepared.tools_active

    def _check_output(self, output: RequestOutput) -> None:
        if output.finish_reason == "error":
            raise BackendError(f"{self.name} failed while generating: {output.error}")

    # -- ChatBackend ----------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        stream, tools_active = self._submit(request)
        pieces: list[str] = []
        final: RequestOutput | None = None
        try:
            async for output in stream:
                self._check_output(output)
                pieces.append(output.text)
                if output.finished:
                    final = output
        finally:
            await stream.aclose()
        if final is None:
            raise BackendError(f"{self.name} ended the request without a final output")
        text = "".join(pieces)
        tool_calls: list[ToolCall] = []
        finish = _finish_reason(final.finish_reason)
        if tools_active:
            rest, parsed = parse_tool_calls(text)
            if parsed:
                text = rest
                tool_calls = [ToolCall(c.id, c.name, c.arguments) for c in parsed]
                finish = "tool_calls"
        return ChatResponse(
            content=text,
            tool_calls=tool_calls,
            finish_reason=finish,
            usage=Usage(final.prompt_tokens, final.completion_tokens),
            model=self.model,
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        stream, tools_active = self._submit(request)
        # With tools on, text that may be a tool call is held back until it either
        # turns out to be plain text or the request ends and it is parsed.
        held = ""
        streaming_text = not tools_active
        try:
            async for output in stream:
                self._check_output(output)
                if streaming_text:
                    if output.text:
                        yield ChatChunk(delta=output.text)
                else:
                    held += output.text
                    head = held.lstrip()
                    if head and not (TOOL_CALL_OPEN.startswith(head) or head.startswith("<")):
                        streaming_text = True
                        yield ChatChunk(delta=held)
                        held = ""
                if not output.finished:
                    continue
                finish = _finish_reason(output.finish_reason)
                if held:
                    rest, parsed = parse_tool_calls(held)
                    if parsed:
                        if rest:
                            yield ChatChunk(delta=rest)
                        yield ChatChunk(
                            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in parsed]
                        )
                        finish = "tool_calls"
                    else:
                        yield ChatChunk(delta=held)
                yield ChatChunk(
                    finish_reason=finish,
                    usage=Usage(output.prompt_tokens, output.completion_tokens),
                )
                return
        finally:
            await stream.aclose()  # aborts the request in the engine if it is still running

    async def health(self) -> bool:
        return bool(self.engine.is_alive)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Exact prompt tokens of ``messages`` under the model's chat template (no tools)."""
        rendered = []
        for message in messages:
            content = message.content or ""
            if message.tool_calls:
                content += "".join(
                    format_tool_call(call.name, call.arguments) for call in message.tool_calls
                )
            if message.role == "tool":
                content = f"<tool_response>\n{content}\n</tool_response>"
            rendered.append({"role": message.role, "content": content})
        prompt = self.engine.tokenizer.apply_chat_template(rendered)
        return len(self.engine.tokenizer.encode(prompt))


def _finish_reason(raw: str | None) -> FinishReason:
    if raw == "length":
        return "length"
    return "stop"  # "stop", and "abort" (the engine stopped it)
