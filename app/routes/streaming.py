"""Helpers shared by the chat routes: time-bounded event streams with TTFT/token metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agents import TokenEvent
from app.errors import ApiError
from app.metrics import ApiMetrics
from app.services.chat import ChatEvent, TurnResult, api_error_of

Item = ChatEvent | TurnResult
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class TimedStream:
    """Pulls events from a chat turn with a deadline, recording TTFT and tokens.

    ``first()`` is awaited before the response starts, so a backend that is down
    still gets a proper HTTP status (503) instead of a stream that starts and fails.
    """

    events: AsyncIterator[Item]
    metrics: ApiMetrics
    mode: str
    timeout_s: float
    started: float = field(default_factory=time.perf_counter)
    _first: Item | None = None
    _pieces: int = 0
    _seen_token: bool = False

    async def _next(self) -> Item:
        remaining = self.started + self.timeout_s - time.perf_counter()
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                item = await anext(self.events)
        except TimeoutError as exc:
            raise ApiError(
                504, f"the request timed out after {self.timeout_s:g} s", "timeout"
            ) from exc
        except StopAsyncIteration:
            raise
        except ApiError:
            raise
        except Exception as exc:
            raise api_error_of(exc) from exc
        self._observe(item)
        return item

    def _observe(self, item: Item) -> None:
        if isinstance(item, TokenEvent):
            self._pieces += 1
            if not self._seen_token:
                self._seen_token = True
                self.metrics.ttft.labels(self.mode).observe(time.perf_counter() - self.started)
        elif isinstance(item, TurnResult):
            tokens = item.usage.completion_tokens if item.usage else self._pieces
            self.metrics.tokens.labels(self.mode).inc(tokens)

    async def first(self) -> None:
        """Pull the first event now (errors surface as ``ApiError`` before any byte is sent)."""
        self._first = await self._next()

    async def __aiter__(self) -> AsyncIterator[Item]:
        if self._first is not None:
            item, self._first = self._first, None
            yield item
        while True:
            try:
                yield await self._next()
            except StopAsyncIteration:
                return

    async def aclose(self) -> None:
        """Stop the turn (closes the backend stream, which cancels generation upstream)."""
        close = getattr(self.events, "aclose", None)
        if close is not None:
            await close()

    async def collect(self) -> tuple[TurnResult, list[Item]]:
        """Run to the end; the result and every event before it."""
        items: list[Item] = []
        try:
            async for item in self:
                if isinstance(item, TurnResult):
                    return item, items
                items.append(item)
        finally:
            await self.aclose()
        raise ApiError(502, "the answer ended without a result", "backend_error")
