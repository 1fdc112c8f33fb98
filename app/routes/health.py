"""``GET /health`` (liveness, no key), ``GET /ready`` (backend, store, db), ``GET /metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.deps import PrincipalDep, StateDep
from app.errors import error_body
from app.metrics import CONTENT_TYPE

public = APIRouter(tags=["health"])
router = APIRouter(tags=["health"])


@public.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


async def _backend_check(state: Any) -> str | None:
    chat = state.chat
    if chat.backend is None:
        return f"no LLM backend: {chat.backend_problem or 'not configured'}"
    timeout = state.settings.api.backend_timeout_s
    try:
        ok = await asyncio.wait_for(chat.backend.health(), timeout)
    except TimeoutError:
        ok = False
    if not ok:
        where = getattr(chat.backend, "base_url", None) or getattr(chat.backend, "name", "")
        return f"LLM backend {chat.backend.name!r} at {where} is not answering"
    return None


@router.get("/ready", response_model=None)
async def ready(state: StateDep, _: PrincipalDep) -> JSONResponse | dict[str, Any]:
    """Readiness: the LLM backend, the vector store and the database answer."""
    backend_problem, store_problem, db_ok = await asyncio.gather(
        _backend_check(state),
        run_in_threadpool(state.collections.ping),
        run_in_threadpool(state.db.ping),
    )
    checks = {
        "backend": backend_problem or "ok",
        "store": store_problem or "ok",
        "database": "ok" if db_ok else "database unreachable",
    }
    problems = [v for v in checks.values() if v != "ok"]
    if problems:
        body = error_body("; ".join(problems), "service_unavailable", "not_ready")
        body["checks"] = checks
        return JSONResponse(body, status_code=503)
    return {"status": "ready", "checks": checks}


@router.get("/metrics")
async def metrics(state: StateDep, _: PrincipalDep) -> Response:
    """Prometheus metrics of this process."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
