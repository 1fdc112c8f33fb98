"""ASGI middleware: request body limits and request metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body
from app.metrics import ApiMetrics


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 when a request body exceeds its limit (declared or streamed).

    Args:
        app: The wrapped app.
        limit_for: ``path -> max bytes`` (uploads get a larger limit than JSON).
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        openai = path.startswith("/v1/")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _send_413(send, limit, openai)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, limit, openai)


async def _send_413(send: Send, limit: int, openai: bool) -> None:
    body = json.dumps(
        error_body(
            f"request body exceeds the limit of {limit} bytes",
            "request_too_large",
            "body_too_large",
            openai=openai,
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Count requests and time them to the response headers, by route template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope.get("method", "")

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                status = int(message["status"])
                self.metrics.requests.labels(method, label, str(status)).inc()
                self.metrics.latency.labels(method, label).observe(time.perf_counter() - started)
                if status >= 400:
                    self.metrics.errors.labels(str(status)).inc()
            await send(message)

        await self.app(scope, receive, timed_send)
