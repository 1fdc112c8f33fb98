"""OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models``.

``model`` names a profile: ``rag`` (answer from ``collection``, an extra body
field), ``agent`` (tools), or the backend's own model (plain passthrough,
tools included). Streams use OpenAI's chunk shapes and end with ``[DONE]``;
citations ride on a chunk as an extra ``citations`` field and agent tool steps
as ``tool_event``, which plain clients ignore. Sampling takes OpenAI's fields
and vLLM's extra body fields ``top_k``, ``min_p`` and ``repetition_penalty``;
in every profile an unset ``repetition_penalty`` gets the server's default
(``agent.repetition_penalty``), as on ``/api/chat``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from agents import CitationsEvent, TokenEvent, ToolCallEvent, ToolResultEvent
from app.deps import ChatDep, PrincipalDep, SettingsDep, StateDep
from app.errors import ApiError, error_body
from app.routes.streaming import STREAM_HEADERS, TimedStream
from app.schemas import ChatCompletionIn, ModelCard, ModelList, OpenAIMessage
from app.services.chat import (
    SAMPLING_FIELDS,
    ChatService,
    ChatTurn,
    TurnResult,
    api_error_of,
    sampling_options,
    tool_call_of,
)
from app.settings import Settings
from llm_backend import BackendError, ChatChunk, ChatMessage, ChatRequest, SamplingOptions

router = APIRouter(prefix="/v1", tags=["openai"])
PROFILES = ("rag", "agent")


def backend_model(settings: Settings, service: ChatService) -> str:
    """The name clients use for plain passthrough to the backend."""
    backend = service.backend
    name = getattr(backend, "model", None) or getattr(
        getattr(backend, "engine", None), "model_name", None
    )
    return str(name or settings.agent.model or settings.engine.model)


@router.get("/models")
async def models(_: PrincipalDep, settings: SettingsDep, service: ChatDep) -> ModelList:
    """The profiles (``rag``, ``agent``) and the backend's model."""
    names = [*PROFILES, backend_model(settings, service)]
    return ModelList(data=[ModelCard(id=n) for n in names])


def _sampling(body: ChatCompletionIn) -> SamplingOptions:
    """The body's sampling fields (OpenAI's and the extras ``top_k``, ``min_p``,
    ``repetition_penalty``), as ``/api/chat`` takes them."""
    values = body.model_dump(include=set(SAMPLING_FIELDS))
    values["max_tokens"] = body.max_completion_tokens or body.max_tokens
    return sampling_options(values)


def _stops(body: ChatCompletionIn) -> list[str] | None:
    return [body.stop] if isinstance(body.stop, str) else body.stop


def _to_chat_message(m: OpenAIMessage) -> ChatMessage:
    role = "system" if m.role == "developer" else m.role
    if role == "assistant":
        calls = [tool_call_of(c) for c in m.tool_calls or []]
        return ChatMessage.assistant(m.text() or None, calls)
    if role == "tool":
        return ChatMessage.tool(m.text(), m.tool_call_id or "", m.name)
    return ChatMessage(role, m.text(), name=m.name)


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    return json.dumps(
        {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        },
        ensure_ascii=False,
    )


def _with(payload: str, **extra: Any) -> str:
    data = json.loads(payload)
    data.update(extra)
    return json.dumps(data, ensure_ascii=False)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionIn,
    who: PrincipalDep,
    service: ChatDep,
    settings: SettingsDep,
    state: StateDep,
) -> Any:
    """Chat completions, streamed (``stream: true``) or in one piece."""
    raw_model = backend_model(settings, service)
    if body.model not in (*PROFILES, raw_model):
        raise ApiError(
            404,
            f"model {body.model!r} not found; use one of {', '.join((*PROFILES, raw_model))}",
            "model_not_found",
            param="model",
        )
    if body.model == raw_model:
        return await _passthrough(body, service, state)
    users = [m for m in body.messages if m.role == "user"]
    if not users or body.messages[-1].role != "user":
        raise ApiError(
            422, "the last message must be the user's question", "invalid_request", param="messages"
        )
    history = [
        ChatMessage.user(m.text()) if m.role == "user" else ChatMessage.assistant(m.text())
        for m in body.messages[:-1]
        if m.role in ("user", "assistant") and m.text()
    ]
    if body.model == "rag" and not body.collection:
        raise ApiError(
            422,
            "model 'rag' needs the extra body field 'collection'",
            "collection_required",
            param="collection",
        )
    turn = ChatTurn(
        tenant=who.tenant,
        mode="rag" if body.model == "rag" else "agent",
        question=body.messages[-1].text(),
        collection=body.collection,
        history=history,
        sampling=_sampling(body),
        stop=_stops(body),
        k=body.k,
    )
    service.check(turn)
    stream = TimedStream(
        service.events(turn), state.metrics, turn.mode, settings.api.request_timeout_s
    )
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if not body.stream:
        result, _ = await stream.collect()
        return _completion(cid, body.model, result.answer, [], result)
    await stream.first()
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            yield {"data": _chunk(cid, body.model, {"role": "assistant", "content": ""})}
            async for item in stream:
                if isinstance(item, TokenEvent):
                    yield {"data": _chunk(cid, body.model, {"content": item.text})}
                elif isinstance(item, ToolCallEvent):
                    event: dict[str, Any] = {"type": "tool_call", "id": item.id}
                    event.update(name=item.name, arguments=item.arguments)
                    yield {"data": _with(_chunk(cid, body.model, {}), tool_event=event)}
                elif isinstance(item, ToolResultEvent):
                    event = {"type": "tool_result", "id": item.id, "name": item.name}
                    event.update(result=item.result, error=item.error)
                    yield {"data": _with(_chunk(cid, body.model, {}), tool_event=event)}
                elif isinstance(item, CitationsEvent):
                    cites = TurnResult("", item.citations, [], None, {}).citations_json()
                    yield {"data": _with(_chunk(cid, body.model, {}), citations=cites)}
                elif isinstance(item, TurnResult):
                    yield {"data": _chunk(cid, body.model, {}, item.finish_reason or "stop")}
                    if include_usage:
                        yield {"data": _usage_chunk(cid, body.model, item)}
        except ApiError as exc:
            state.metrics.errors.labels(exc.code).inc()
            yield {"data": json.dumps(error_body(exc.message, exc.type, exc.code, openai=True))}
        finally:
            await stream.aclose()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), headers=STREAM_HEADERS, ping=15)


def _usage_chunk(cid: str, model: str, result: TurnResult) -> str:
    data = json.loads(_chunk(cid, model, {}))
    data["choices"] = []
    data["usage"] = result.usage_json()
    return json.dumps(data)


def _completion(
    cid: str, model: str, content: str, tool_calls: list[dict[str, Any]], result: TurnResult
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    elif message["content"] is None:
        message["content"] = ""
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": result.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": result.usage_json()
        or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    if result.citations:
        out["citations"] = result.citations_json()
    if result.tool_calls:
        out["tool_trace"] = result.tool_calls
    return out


async def _passthrough(body: ChatCompletionIn, service: ChatService, state: StateDep) -> Any:
    backend = service.require_backend()
    limit = state.settings.api.max_message_chars * 4
    if sum(len(m.text()) for m in body.messages) > limit:
        raise ApiError(
            413, f"messages exceed {limit} characters", "message_too_long", param="messages"
        )
    try:
        request = ChatRequest(
            [_to_chat_message(m) for m in body.messages],
            tools=body.tools,
            tool_choice=body.tool_choice,  # type: ignore[arg-type]
            response_format=body.response_format,
            sampling=service.sampling_for(_sampling(body)),
            stop=_stops(body),
            model=body.model,
        )
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid_request") from exc
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    timeout = state.settings.api.request_timeout_s
    if not body.stream:
        try:
            response = await backend.chat(request)
        except (BackendError, ValueError) as exc:
            raise api_error_of(exc) from exc
        calls = [{**c.to_openai()} for c in response.tool_calls]
        result = TurnResult(response.content, [], [], response.usage, {}, False)
        result.finish_reason = response.finish_reason
        return _completion(cid, body.model, response.content, calls, result)

    chunks = cast(AsyncGenerator[ChatChunk, None], backend.stream(request))
    metrics = state.metrics
    started = time.perf_counter()
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except (BackendError, ValueError) as exc:
        raise api_error_of(exc) from exc
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[dict[str, str]]:
        seen_token = False
        index = 0
        usage = None
        tokens = 0
        try:
            yield {"data": _chunk(cid, body.model, {"role": "assistant", "content": ""})}
            pending = [first] if first is not None else []
            while True:
                if pending:
                    chunk = pending.pop()
                else:
                    if time.perf_counter() - started > timeout:
                        raise ApiError(504, f"the request timed out after {timeout:g} s", "timeout")
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                if chunk.delta:
                    tokens += 1
                    if not seen_token:
                        seen_token = True
                        metrics.ttft.labels("llm").observe(time.perf_counter() - started)
                    yield {"data": _chunk(cid, body.model, {"content": chunk.delta})}
                if chunk.tool_calls:
                    deltas = []
                    for call in chunk.tool_calls:
                        deltas.append({"index": index, **call.to_openai()})
                        index += 1
                    yield {"data": _chunk(cid, body.model, {"tool_calls": deltas})}
                usage = chunk.usage or usage
                if chunk.finish_reason:
                    yield {"data": _chunk(cid, body.model, {}, chunk.finish_reason)}
            metrics.tokens.labels("llm").inc(usage.completion_tokens if usage else tokens)
            if include_usage:
                result = TurnResult("", [], [], usage, {})
                yield {"data": _usage_chunk(cid, body.model, result)}
        except (BackendError, ValueError, ApiError) as exc:
            err = api_error_of(exc)
            metrics.errors.labels(err.code).inc()
            yield {"data": json.dumps(error_body(err.message, err.type, err.code, openai=True))}
        finally:
            await chunks.aclose()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), headers=STREAM_HEADERS, ping=15)
