"""Chat sessions and their history, per tenant, in the service database.

Example:
    >>> store = SessionStore(db)
    >>> session = store.open("acme", None, collection="docs", mode="rag", title="refunds?")
    >>> store.history("acme", session.id)
    []
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from app.db import ChatSession, Database, Message, new_id
from app.errors import not_found
from llm_backend import ChatMessage

HISTORY_TURNS = 10
"""Earlier user/assistant pairs given to the model with a follow-up."""


class SessionStore:
    """Creates, reads and deletes a tenant's sessions; every lookup checks the tenant.

    Args:
        db: The service database.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def open(
        self, tenant: str, session_id: str | None, *, collection: str | None, mode: str, title: str
    ) -> ChatSession:
        """The tenant's session ``session_id``, or a new one when it is None.

        Raises:
            ApiError: 404 when ``session_id`` is not a session of this tenant.
        """
        with self.db.session() as s:
            if session_id is not None:
                found = s.get(ChatSession, session_id)
                if found is None or found.tenant != tenant:
                    raise not_found("session", session_id)
                return found
            session = ChatSession(
                id=new_id("sess"),
                tenant=tenant,
                title=" ".join(title.split())[:80],
                collection=collection,
                mode=mode,
            )
            s.add(session)
            return session

    def get(self, tenant: str, session_id: str) -> tuple[ChatSession, list[Message]]:
        """A session and its messages, oldest first.

        Raises:
            ApiError: 404 for an unknown session or another tenant's.
        """
        with self.db.session() as s:
            found = s.get(ChatSession, session_id)
            if found is None or found.tenant != tenant:
                raise not_found("session", session_id)
            return found, list(found.messages)

    def list_sessions(self, tenant: str, limit: int = 100) -> list[ChatSession]:
        """The tenant's sessions, most recently used first."""
        with self.db.session() as s:
            query = (
                select(ChatSession)
                .where(ChatSession.tenant == tenant)
                .order_by(ChatSession.updated_at.desc())
                .limit(limit)
            )
            return list(s.scalars(query).all())

    def delete(self, tenant: str, session_id: str) -> None:
        """Delete a session and its messages.

        Raises:
            ApiError: 404 for an unknown session or another tenant's.
        """
        with self.db.session() as s:
            found = s.get(ChatSession, session_id)
            if found is None or found.tenant != tenant:
                raise not_found("session", session_id)
            s.delete(found)

    def history(self, tenant: str, session_id: str) -> list[ChatMessage]:
        """The last ``HISTORY_TURNS`` user/assistant pairs as chat messages."""
        _, messages = self.get(tenant, session_id)
        turns = [m for m in messages if m.role in ("user", "assistant")]
        return [
            ChatMessage.user(m.content) if m.role == "user" else ChatMessage.assistant(m.content)
            for m in turns[-2 * HISTORY_TURNS :]
        ]

    def append_turn(
        self,
        session_id: str,
        question: str,
        answer: str,
        citations: list[dict[str, Any]],
        tool_calls: list[dict[str, Any]],
    ) -> None:
        """Record a finished turn (question and answer)."""
        now = time.time()
        with self.db.session() as s:
            session = s.get(ChatSession, session_id)
            if session is None:  # deleted while the answer streamed
                return
            s.add(Message(session_id=session_id, role="user", content=question, created_at=now))
            s.add(
                Message(
                    session_id=session_id,
                    role="assistant",
                    content=answer,
                    citations=citations,
                    tool_calls=tool_calls,
                    created_at=now,
                )
            )
            session.updated_at = now
