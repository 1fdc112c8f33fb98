"""Dependency aliases: routes read ``def list_sessions(sessions: SessionsDep, who: PrincipalDep)``.

Everything the routes need hangs off one ``AppState`` on ``app.state.ragloom``;
tests swap parts of it (e.g. a scripted backend) through ``create_app``'s arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from app.auth import LOCAL_TENANT, Principal, RateLimiter, authenticate, bearer_token
from app.db import Database
from app.metrics import ApiMetrics
from app.services.chat import ChatService
from app.services.collections import CollectionService
from app.services.sessions import SessionStore
from app.settings import Settings


@dataclass
class AppState:
    """The service's long-lived parts, built once by ``create_app``."""

    settings: Settings
    db: Database
    metrics: ApiMetrics
    rate_limiter: RateLimiter
    collections: CollectionService
    sessions: SessionStore
    chat: ChatService


def get_state(request: Request) -> AppState:
    """The app's state."""
    state: AppState = request.app.state.ragloom
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_principal(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """The caller: from the ``Authorization: Bearer`` key, or tenant ``local`` when auth is off.

    Raises:
        ApiError: 401 for a missing/bad key, 429 when the key's rate limit is spent.
    """
    if state.settings.api.auth == "off":
        principal = Principal(LOCAL_TENANT, None)
    else:
        principal = authenticate(state.db, bearer_token(authorization))
    state.rate_limiter.check(principal.key_id or principal.tenant)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


def get_collections(state: StateDep) -> CollectionService:
    return state.collections


def get_sessions(state: StateDep) -> SessionStore:
    return state.sessions


def get_chat(state: StateDep) -> ChatService:
    return state.chat


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
CollectionsDep = Annotated[CollectionService, Depends(get_collections)]
SessionsDep = Annotated[SessionStore, Depends(get_sessions)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
