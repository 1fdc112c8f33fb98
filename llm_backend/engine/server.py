"""OpenAI-compatible HTTP server over an ``AsyncEngine``.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with SSE streaming), ``GET /health``, ``GET /metrics`` (Prometheus). Every
error leaves as ``{"error": {message, type, param, code}}``: 400 for bad requests
(malformed JSON included), 404 for an unknown model, 503 when the engine's queue
is full. A client that disconnects mid-request aborts it in the engine.

Example:
    >>> engine = AsyncEngine(load_model(path), model_name="smollm2-135m").start()
    >>> app = create_app(engine)
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_backend.engine.async_engine import AsyncEngine, RequestStream
from llm_backend.engine.errors import EngineError
from llm_backend.engine.metrics import CONTENT_TYPE
from llm_backend.engine.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    ResponseMessage,
    TokenLogprobOut,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
)
from llm_backend.engine.sampling import SamplingParams
from llm_backend.engine.scheduler import EngineOverloaded, RequestOutput, TokenLogprob
from llm_backend.engine.structured import (
    TOOL_CALL_OPEN,
    StructuredOutputError,
    ToolSpec,
    format_tool_call,
    parse_tool_calls,
    tool_system_prompt,
)

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.5


@dataclass
class _Prepared:
    """A validated request turned into engine inputs."""

    prompt_ids: list[int]
    params: SamplingParams
    grammar: str | None = None
    tools_active: bool = False
    ignore_eos: bool = False
    stop_ids: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------- request -> engine
def _check_common(engine: AsyncEngine, request: ChatCompletionRequest | CompletionRequest) -> None:
    if request.model != engine.model_name:
        raise APIError(
            404,
            f"The model `{request.model}` does not exist; this server serves "
            f"`{engine.model_name}`.",
            param="model",
            code="model_not_found",
        )
    if request.n != 1:
        raise APIError(
            400, f"n must be 1 (only one choice is supported), got {request.n}", param="n"
        )


def _sampling(
    request: ChatCompletionRequest | CompletionRequest, prompt_len: int, limit: int
) -> SamplingParams:
    if prompt_len >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"has {prompt_len} tokens. Please reduce the length of the prompt.",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    try:
        params = request.sampling_params(default_max_tokens=limit - prompt_len)
    except ValueError as exc:
        message = str(exc)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from exc
    if prompt_len + params.max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the prompt, "
            f"{params.max_tokens} in the completion). Please reduce the length of the "
            "prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return params


def _tools_and_grammar(
    engine: AsyncEngine, request: ChatCompletionRequest
) -> tuple[list[ToolSpec], str | None]:
    """The tools offered to the model and the grammar constraining its reply."""
    tools = [
        ToolSpec(t.function.name, t.function.description or "", t.function.parameters or {})
        for t in request.tools or []
    ]
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice requires `tools`", param="tool_choice")
    try:
        if isinstance(choice, str) and choice == "none":
            tools = []
        elif not isinstance(choice, str):
            named = [t for t in tools if t.name == choice.function.name]
            if not named:
                raise APIError(
                    400,
                    f"tool_choice names `{choice.function.name}`, which is not in `tools` "
                    f"({', '.join(t.name for t in tools)})",
                    param="tool_choice",
                )
            return tools, engine.grammars.tool_call(named, "named")
        elif choice == "required":
            return tools, engine.grammars.tool_call(tools, "required")
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format json_schema needs `json_schema.schema`",
                    param="response_format",
                )
            return tools, engine.grammars.json_schema(fmt.json_schema.schema_)
        if fmt is not None and fmt.type == "json_object":
            return tools, engine.grammars.json_schema(None)
        if tools:
            return tools, engine.grammars.tool_call(tools, "auto")
        return tools, None
    except StructuredOutputError as exc:
        param = "tools" if tools and request.response_format is None else "response_format"
        raise APIError(400, str(exc), param=param) from exc


def _render_messages(
    engine: AsyncEngine, messages: list[ChatMessage], tools: list[ToolSpec]
) -> str:
    rendered: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        content = message.text()
        if message.role == "assistant" and message.tool_calls:
            calls = "".join(
                format_tool_call(c.function.name, c.function.arguments) for c in message.tool_calls
            )
            content = f"{content}{calls}"
        if message.role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        rendered.append({"role": role, "content": content})
    template_tools = None
    if tools:
        if "tools" in getattr(engine.tokenizer, "chat_template_source", ""):
            template_tools = [t.as_openai() for t in tools]
        else:  # the template ignores tools: describe them in the system prompt
            prompt = tool_system_prompt(tools)
            if rendered and rendered[0]["role"] == "system":
                rendered[0]["content"] = f"{rendered[0]['content']}\n\n{prompt}"
            else:
                rendered.insert(0, {"role": "system", "content": prompt})
    try:
        return str(engine.tokenizer.apply_chat_template(rendered, tools=template_tools))
    except EngineError as exc:
        raise APIError(400, str(exc), param="messages") from exc


def prepare_chat(engine: AsyncEngine, request: ChatCompletionRequest) -> _Prepared:
    """Validate a chat request and build its prompt ids, sampling params and grammar."""
    _check_common(engine, request)
    tools, grammar = _tools_and_grammar(engine, request)
    prompt = _render_messages(engine, request.messages, tools)
    prompt_ids = engine.tokenizer.encode(prompt)
    params = _sampling(request, len(prompt_ids), engine.max_seq_len)
    return _Prepared(prompt_ids, params, grammar, bool(tools), request.ignore_eos)


def prepare_completion(engine: AsyncEngine, request: CompletionRequest) -> _Prepared:
    """Validate a text completion request."""
    _check_common(engine, request)
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(
                400, f"prompt must be one string, got a list of {len(prompt)}", param="prompt"
            )
        prompt = prompt[0]
    if request.echo or request.suffix:
        raise APIError(400, "echo and suffix are not supported", param="echo")
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
    if not prompt_ids:
        raise APIError(400, "prompt must not be empty", param="prompt")
    params = _sampling(request, len(prompt_ids), engine.max_seq_len)
    return _Prepared(prompt_ids, params, None, False, request.ignore_eos)


def _submit(engine: AsyncEngine, prepared: _Prepared) -> RequestStream:
    try:
        return engine.submit(
            prepared.prompt_ids,
            prepared.params,
            grammar=prepared.grammar,
            ignore_eos=prepared.ignore_eos,
        )
    except EngineOverloaded as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_overloaded") from exc
    except EngineError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_unavailable") from exc


# ---------------------------------------------------------------------- engine -> response
def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=item.token,
                logprob=item.logprob,
                bytes=_token_bytes(item.token),
                top_logprobs=[
                    TopLogprob(token=text, logprob=value, bytes=_token_bytes(text))
                    for _, text, value in item.top
                ],
            )
            for item in items
        ]
    )


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for item in items:
        result.tokens.append(item.token)
        result.token_logprobs.append(item.logprob)
        result.top_logprobs.append({text: value for _, text, value in item.top})
        result.text_offset.append(offset)
        offset += len(item.token)
    return result


def _raise_if_error(output: RequestOutput) -> None:
    if output.finish_reason == "error":
        raise APIError(500, output.error or "generation failed", type="server_error")


def _finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


async def _collect(stream: RequestStream, raw: Request) -> list[RequestOutput]:
    """All outputs of a non-streaming request; aborts it if the client goes away."""
    outputs: list[RequestOutput] = []
    try:
        iterator = stream.__aiter__()
        while True:
            next_output = asyncio.ensure_future(iterator.__anext__())
            while True:
                done, _ = await asyncio.wait({next_output}, timeout=_DISCONNECT_POLL_S)
                if done:
                    break
                if await raw.is_disconnected():
                    next_output.cancel()
                    logger.info("client disconnected; aborting %s", stream.request_id)
                    return outputs
            try:
                output = next_output.result()
            except StopAsyncIteration:
                return outputs
            outputs.append(output)
            if output.finished:
                return outputs
    finally:
        await stream.aclose()


def _tool_calls_of(calls: list[Any]) -> list[ToolCall]:
    return [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]


def _chat_response(
    engine: AsyncEngine, prepared: _Prepared, outputs: list[RequestOutput], request_id: str
) -> ChatCompletionResponse:
    final = outputs[-1]
    _raise_if_error(final)
    text = "".join(o.text for o in outputs)
    logprob_items = [item for o in outputs for item in (o.logprobs or [])]
    content: str | None = text
    tool_calls = None
    reason = _finish_reason(final.finish_reason)
    if prepared.tools_active:
        rest, calls = parse_tool_calls(text)
        if calls:
            content, tool_calls, reason = rest or None, _tool_calls_of(calls), "tool_calls"
    return ChatCompletionResponse(
        id=request_id,
        model=engine.model_name,
        choices=[
            ChatChoice(
                message=ResponseMessage(content=content, tool_calls=tool_calls),
                logprobs=_chat_logprobs(logprob_items) if prepared.params.logprobs else None,
                finish_reason=reason,
            )
        ],
        usage=Usage.of(final.prompt_tokens, final.completion_tokens, final.cached_tokens),
    )


def _sse(model: Any) -> str:
    return json.dumps(model.model_dump(exclude_none=True), ensure_ascii=False)


async def _chat_events(
    engine: AsyncEngine,
    prepared: _Prepared,
    stream: RequestStream,
    request_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE payloads of a streamed chat completion, then ``[DONE]``."""

    def chunk(delta: ChoiceDelta, reason: str | None = None, logprobs: Any = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=reason, logprobs=logprobs)
        return _sse(ChatCompletionChunk(id=request_id, model=engine.model_name, choices=[choice]))

    buffered = ""  # text held while it may still be a tool call
    streaming_text = not prepared.tools_active
    try:
        yield chunk(ChoiceDelta(role="assistant", content=""))
        async for output in stream:
            if output.finish_reason == "error":
                yield json.dumps(
                    APIError(500, output.error or "generation failed", type="server_error").body()
                )
                break
            logprobs = _chat_logprobs(output.logprobs) if prepared.params.logprobs else None
            if streaming_text:
                if output.text or logprobs:
                    yield chunk(ChoiceDelta(content=output.text), logprobs=logprobs)
            else:
                buffered += output.text
                head = buffered.lstrip()
                if head and not (TOOL_CALL_OPEN.startswith(head) or head.startswith("<")):
                    streaming_text = True  # plain text: the model chose not to call a tool
                    yield chunk(ChoiceDelta(content=buffered), logprobs=logprobs)
                    buffered = ""
            if not output.finished:
                continue
            reason = _finish_reason(output.finish_reason)
            if buffered:
                rest, calls = parse_tool_calls(buffered)
                if calls:
                    deltas = [
                        ToolCallDelta(
                            index=i,
                            id=c.id,
                            type="function",
                            function=FunctionCall(name=c.name, arguments=c.arguments),
                        )
                        for i, c in enumerate(calls)
                    ]
                    yield chunk(ChoiceDelta(content=rest or None, tool_calls=deltas))
                    reason = "tool_calls"
                else:
                    yield chunk(ChoiceDelta(content=buffered))
            yield chunk(ChoiceDelta(), reason)
            if include_usage:
                usage = Usage.of(
                    output.prompt_tokens, output.completion_tokens, output.cached_tokens
                )
                yield _sse(
                    ChatCompletionChunk(
                        id=request_id, model=engine.model_name, choices=[], usage=usage
                    )
                )
        yield "[DONE]"
    finally:
        await stream.aclose()  # a disconnect cancels us here: abort in the engine


async def _completion_events(
    engine: AsyncEngine,
    prepared: _Prepared,
    stream: RequestStream,
    request_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    offset = 0
    try:
        async for output in stream:
            if output.finish_reason == "error":
                yield json.dumps(
                    APIError(500, output.error or "generation failed", type="server_error").body()
                )
                break
            logprobs = None
            if prepared.params.logprobs and output.logprobs:
                logprobs = _completion_logprobs(output.logprobs, offset)
            offset += len(output.text)
            if output.text or output.finished:
                choice = CompletionChoice(
                    text=output.text,
                    logprobs=logprobs,
                    finish_reason=_finish_reason(output.finish_reason) if output.finished else None,
                )
                yield _sse(
                    CompletionResponse(id=request_id, model=engine.model_name, choices=[choice])
                )
            if output.finished and include_usage:
                usage = Usage.of(
                    output.prompt_tokens, output.completion_tokens, output.cached_tokens
                )
                yield _sse(
                    CompletionResponse(
                        id=request_id, model=engine.model_name, choices=[], usage=usage
                    )
                )
        yield "[DONE]"
    finally:
        await stream.aclose()


# ---------------------------------------------------------------------- app
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if param is None:
        return "request body must be a JSON object (Content-Type: application/json)", None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def create_app(engine: AsyncEngine) -> FastAPI:
    """The FastAPI app serving ``engine`` (which the caller starts and stops).

    Example:
        >>> app = create_app(AsyncEngine(loaded, model_name="smollm2-135m").start())
    """
    app = FastAPI(title="ragloom engine", version="0.1.0")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.is_alive
        body = {
            "status": "ok" if alive else "engine stopped",
            "running": engine.num_running,
            "waiting": engine.num_waiting,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=engine.model_name, max_model_len=engine.max_seq_len)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatCompletionRequest, raw: Request) -> Any:
        prepared = prepare_chat(engine, request)
        stream = _submit(engine, prepared)
        request_id = new_id("chatcmpl")
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _chat_events(engine, prepared, stream, request_id, include_usage)
            return EventSourceResponse(events, ping=15)
        outputs = await _collect(stream, raw)
        if not outputs or not outputs[-1].finished:
            return Response(status_code=499)
        return _chat_response(engine, prepared, outputs, request_id)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, raw: Request) -> Any:
        prepared = prepare_completion(engine, request)
        stream = _submit(engine, prepared)
        request_id = new_id("cmpl")
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _completion_events(engine, prepared, stream, request_id, include_usage)
            return EventSourceResponse(events, ping=15)
        outputs = await _collect(stream, raw)
        if not outputs or not outputs[-1].finished:
            return Response(status_code=499)
        final = outputs[-1]
        _raise_if_error(final)
        items = [item for o in outputs for item in (o.logprobs or [])]
        choice = CompletionChoice(
            text="".join(o.text for o in outputs),
            logprobs=_completion_logprobs(items, 0) if prepared.params.logprobs else None,
            finish_reason=_finish_reason(final.finish_reason),
        )
        usage = Usage.of(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        return CompletionResponse(
            id=request_id, model=engine.model_name, choices=[choice], usage=usage
        )

    return app
