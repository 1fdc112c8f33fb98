"""The FastAPI app factory of the ragloom REST API.

Routes: ``/api/chat``, ``/api/sessions``, ``/api/collections`` (+ documents,
uploads), ``/api/jobs``, ``/api/search``, ``/api/eval/runs``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/ready``, ``/metrics``. Every route but
``/health`` needs ``Authorization: Bearer <key>`` unless ``RAGLOOM_API__AUTH=off``.

Example:
    >>> from app.main import create_app
    >>> app = create_app()                                  # settings from RAGLOOM_*
    >>> app = create_app(settings, backend=ScriptedBackend([...]))   # tests
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from app.auth import RateLimiter
from app.db import Database
from app.deps import AppState, get_principal
from app.errors import install_error_handlers
from app.metrics import ApiMetrics
from app.middleware import BodyLimitMiddleware, MetricsMiddleware
from app.routes import chat, collections, health, openai, sessions
from app.routes import eval as eval_routes
from app.services.chat import ChatService
from app.services.collections import CollectionService
from app.services.eval_runs import EvalRunService
from app.services.sessions import SessionStore
from app.settings import Settings, get_settings
from llm_backend import ChatBackend
from retrieval import Embedder

logger = logging.getLogger(__name__)
_MULTIPART_SLACK = 1024 * 1024


def database_url(settings: Settings) -> str:
    """The configured database URL, or SQLite in the data folder."""
    if settings.api.database_url:
        return settings.api.database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{settings.data_dir / 'api.sqlite'}"


def _build_backend(settings: Settings) -> tuple[ChatBackend | None, str | None]:
    from app.services.wiring import build_backend
    from llm_backend.engine.errors import EngineError
    from llm_backend.errors import BackendError

    try:
        return build_backend(settings, settings.agent.backend, None, None), None
    except (BackendError, EngineError, OSError, ValueError, ImportError) as exc:
        logger.error("cannot start the %s LLM backend: %s", settings.agent.backend, exc)
        return None, f"cannot start the {settings.agent.backend} backend: {exc}"


def _warm_up(embedder: Any) -> None:
    """Load the embedding model in the background; a failure shows on first use."""
    try:
        embedder.warm_up()
    except Exception as exc:  # the request that needs the model reports it properly
        logger.warning("embedding model warm-up failed: %s", exc)


def create_app(
    settings: Settings | None = None,
    *,
    backend: ChatBackend | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    """Build the API app.

    Args:
        settings: Defaults to ``get_settings()`` (the environment).
        backend: The LLM backend; default built from ``settings.agent``
            (our engine in-process, or an OpenAI-compatible server).
        embedder: The embedding model shared by ingestion and retrieval; default
            ``settings.retrieval.embedding_model`` (loaded on first use).
    """
    settings = settings or get_settings()
    db = Database(database_url(settings))
    metrics = ApiMetrics()
    owns_embedder = embedder is None
    if embedder is None:
        from retrieval import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(
            settings.retrieval.embedding_model,
            query_dtype=settings.retrieval.query_dtype,
            query_backend=settings.retrieval.query_backend,
        )
    collection_service = CollectionService(settings, embedder, db, metrics)
    owns_backend = backend is None
    problem = None
    if backend is None:
        backend, problem = _build_backend(settings)
    state = AppState(
        settings=settings,
        db=db,
        metrics=metrics,
        rate_limiter=RateLimiter(settings.api.rate_limit_per_minute),
        collections=collection_service,
        sessions=SessionStore(db),
        chat=ChatService(settings, backend, collection_service, problem),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owns_embedder:  # load the model (and its query encoder) before the first request
            threading.Thread(target=_warm_up, args=(embedder,), daemon=True).start()
        yield
        eval_runs.close()
        collection_service.close()
        close = getattr(state.chat.backend, "close", None)
        if owns_backend and callable(close):
            result: Any = close()
            if hasattr(result, "__await__"):
                await result
        db.close()

    app = FastAPI(title="ragloom", version="0.1.0", lifespan=lifespan)
    app.state.ragloom = state
    eval_runs = EvalRunService(settings, db, embedder)
    app.state.eval_runs = eval_runs
    install_error_handlers(app)

    upload_limit = int(
        settings.api.max_upload_mb * 1024 * 1024 * settings.api.max_upload_files + _MULTIPART_SLACK
    )
    json_limit = settings.api.max_body_kb * 1024

    def limit_for(path: str) -> int:
        return upload_limit if path.endswith("/documents") else json_limit

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(health.public)
    protected = [Depends(get_principal)]
    routers = (health.router, chat.router, sessions.router, collections.router, eval_routes.router)
    for router in routers:
        app.include_router(router, dependencies=protected)
    app.include_router(openai.router, dependencies=protected)
    return app
