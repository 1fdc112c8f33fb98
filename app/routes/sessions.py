"""``GET /api/sessions``, ``GET /api/sessions/{id}``, ``DELETE /api/sessions/{id}``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from app.db import ChatSession
from app.deps import PrincipalDep, SessionsDep
from app.schemas import MessagePublic, SessionDetail, SessionPublic, SessionsPublic

router = APIRouter(prefix="/api/sessions", tags=["sessions"])


def _public(s: ChatSession) -> SessionPublic:
    return SessionPublic(
        id=s.id,
        title=s.title,
        collection=s.collection,
        mode=s.mode,
        created_at=s.created_at,
        updated_at=s.updated_at,
    )


@router.get("")
async def list_sessions(who: PrincipalDep, sessions: SessionsDep) -> SessionsPublic:
    """The caller's sessions, most recent first."""
    rows = await run_in_threadpool(sessions.list_sessions, who.tenant)
    return SessionsPublic(data=[_public(s) for s in rows])


@router.get("/{session_id}")
async def get_session(session_id: str, who: PrincipalDep, sessions: SessionsDep) -> SessionDetail:
    """A session with its messages."""
    session, messages = await run_in_threadpool(sessions.get, who.tenant, session_id)
    return SessionDetail(
        **_public(session).model_dump(),
        messages=[
            MessagePublic(
                role=m.role,
                content=m.content,
                citations=m.citations,
                tool_calls=m.tool_calls,
                created_at=m.created_at,
            )
            for m in messages
        ],
    )


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, who: PrincipalDep, sessions: SessionsDep) -> Response:
    """Delete a session and its history."""
    await run_in_threadpool(sessions.delete, who.tenant, session_id)
    return Response(status_code=204)
