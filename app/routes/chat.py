"""``POST /api/chat``: RAG, agent or plain-LLM answers, streamed as SSE or in one piece.

SSE events: ``token`` ``{"text"}``, ``tool_call`` ``{"id","name","arguments"}``,
``tool_result`` ``{"id","name","result","error"}``, ``citations`` ``{"citations"}``,
``done`` (the full ``ChatOut``) and, if the turn fails mid-stream, ``error``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from agents import CitationsEvent, TokenEvent, ToolCallEvent, ToolResultEvent
from app.deps import ChatDep, PrincipalDep, SessionsDep, SettingsDep, StateDep
from app.errors import ApiError, error_body
from app.routes.streaming import STREAM_HEADERS, TimedStream
from app.schemas import ChatIn, ChatOut
from app.services.chat import ChatTurn, TurnResult, sampling_options

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["chat"])


def _out(session_id: str, mode: str, result: TurnResult) -> ChatOut:
    return ChatOut.model_validate(
        {
            "session_id": session_id,
            "mode": mode,
            "answer": result.answer,
            "citations": result.citations_json(),
            "tool_calls": result.tool_calls,
            "usage": result.usage_json(),
            "timings": result.timings,
            "refused": result.refused,
            "finish_reason": result.finish_reason,
        }
    )


def _sse(event: str, data: Any) -> dict[str, str]:
    return {"event": event, "data": json.dumps(data, ensure_ascii=False)}


@router.post("/chat", response_model=ChatOut)
async def chat(
    body: ChatIn,
    who: PrincipalDep,
    service: ChatDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    state: StateDep,
) -> Any:
    """Answer a message; follow-ups in a session see the session's history."""
    turn = ChatTurn(
        tenant=who.tenant,
        mode=body.mode,
        question=body.message,
        collection=body.collection,
        sampling=sampling_options(body.sampling.model_dump(), param="sampling"),
        stop=body.sampling.stop,
        k=body.k,
    )
    service.check(turn)
    session = await run_in_threadpool(
        sessions.open,
        who.tenant,
        body.session_id,
        collection=body.collection,
        mode=body.mode,
        title=body.message,
    )
    if body.session_id is not None:
        turn.history = await run_in_threadpool(sessions.history, who.tenant, session.id)
    stream = TimedStream(
        service.events(turn), state.metrics, body.mode, settings.api.request_timeout_s
    )

    async def save(result: TurnResult) -> None:
        await run_in_threadpool(
            sessions.append_turn,
            session.id,
            body.message,
            result.answer,
            result.citations_json(),
            result.tool_calls,
        )

    if not body.stream:
        result, _ = await stream.collect()
        await save(result)
        return _out(session.id, body.mode, result)

    await stream.first()  # a dead backend is a 503 here, before the stream starts

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for item in stream:
                if isinstance(item, TokenEvent):
                    yield _sse("token", {"text": item.text})
                elif isinstance(item, ToolCallEvent):
                    yield _sse(
                        "tool_call", {"id": item.id, "name": item.name, "arguments": item.arguments}
                    )
                elif isinstance(item, ToolResultEvent):
                    yield _sse(
                        "tool_result",
                        {
                            "id": item.id,
                            "name": item.name,
                            "result": item.result,
                            "error": item.error,
                        },
                    )
                elif isinstance(item, CitationsEvent):
                    citations = TurnResult("", item.citations, [], None, {}).citations_json()
                    yield _sse("citations", {"citations": citations})
                elif isinstance(item, TurnResult):
                    await save(item)
                    yield _sse("done", _out(session.id, body.mode, item).model_dump())
        except ApiError as exc:
            state.metrics.errors.labels(exc.code).inc()
            yield _sse("error", error_body(exc.message, exc.type, exc.code))
        finally:
            await stream.aclose()

    return EventSourceResponse(
        events(), headers={**STREAM_HEADERS, "X-Session-Id": session.id}, ping=15
    )
