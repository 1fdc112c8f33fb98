"""The engine thread and its asyncio face.

``AsyncEngine`` starts one background thread that owns the model and runs
``Scheduler.step()`` while there is work. asyncio code submits requests and aborts
through thread-safe queues; each request's outputs come back on its own
``asyncio.Queue`` via ``loop.call_soon_threadsafe``. Closing a ``RequestStream``
before it finished (a client disconnect) aborts the request: its slot is free
after the engine's next step.

Example:
    >>> engine = AsyncEngine(load_model(path), model_name="smollm2-135m").start()
    >>> stream = engine.submit(prompt_ids, SamplingParams(max_tokens=16))
    >>> async for output in stream:
    ...     print(output.text, end="")
    >>> engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from llm_backend.engine.errors import EngineError
from llm_backend.engine.metrics import EngineMetrics
from llm_backend.engine.sampling import SamplingParams
from llm_backend.engine.scheduler import (
    EngineOverloaded,
    EngineRequest,
    RequestOutput,
    Scheduler,
    SchedulerConfig,
)
from llm_backend.engine.structured import GrammarCompiler
from llm_backend.threads import run_on_fresh_thread

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class RequestStream:
    """Async iterator over one request's ``RequestOutput`` deltas.

    Iteration ends after the output with ``finished=True``. ``aclose()`` (or leaving
    an ``async with`` block) before that aborts the request in the engine.
    """

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _push(self, output: RequestOutput) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._engine.abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        output = await self._queue.get()
        if output.finished:
            self.finished = True
        return output

    async def aclose(self) -> None:
        """Abort the request unless it already finished."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncEngine:
    """A model served by one scheduler thread, used from asyncio.

    Args:
        loaded: A ``LoadedModel`` (model with caches, tokenizer).
        model_name: The id clients use in ``model``.
        config: Scheduler limits; defaults use every cache slot.
        metrics: Prometheus metrics; a fresh ``EngineMetrics`` when None.
    """

    def __init__(
        self,
        loaded: Any,
        *,
        model_name: str = "model",
        config: SchedulerConfig | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.loaded = loaded
        self.model_name = model_name
        self.tokenizer = loaded.tokenizer
        self.metrics = metrics or EngineMetrics(model_name)
        self.grammars = GrammarCompiler(loaded.tokenizer, int(loaded.model.args.vocab_size))
        # The scheduler allocates its buffers on a short-lived thread: the caller's
        # thread (the HTTP server's) must not keep an OpenMP pool (llm_backend.threads).
        self.scheduler = run_on_fresh_thread(
            lambda: Scheduler(
                loaded.model,
                loaded.tokenizer,
                config or SchedulerConfig(max_running=loaded.model.max_batch),
                grammars=self.grammars,
                metrics=self.metrics,
            ),
            name="ragloom-engine-setup",
        )
        self.max_seq_len: int = self.scheduler.max_seq_len
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._submit_lock = threading.Lock()
        self._unadmitted = 0  # submitted, not yet handed to the scheduler

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> AsyncEngine:
        """Start the engine thread (idempotent); returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="ragloom-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything and join the engine thread."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.1fs", timeout)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + self._unadmitted

    # ----------------------------------------------------------------- requests
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        grammar: str | None = None,
        ignore_eos: bool = False,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; return its output stream. Call from a running event loop.

        Raises:
            EngineOverloaded: The waiting queue is full.
            EngineError: The engine is not running.
        """
        if not self.is_alive:
            raise EngineError("engine is not running (call start())")
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = RequestStream(self, request_id)
        request = EngineRequest(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            on_output=stream._push,
            grammar=grammar,
            ignore_eos=ignore_eos,
        )
        limit = self.scheduler.config.max_waiting
        with self._submit_lock:
            waiting = self.scheduler.num_waiting + self._unadmitted
            free = self.scheduler.config.max_running - self.scheduler.num_running
            if waiting - free >= limit:
                raise EngineOverloaded(
                    f"engine overloaded: {max(waiting - free, 0)} requests already waiting "
                    f"(max_waiting={limit}); retry later"
                )
            self._unadmitted += 1
        self._inbox.put(("add", request))
        self._wakeup.set()
        return stream

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, **options: Any
    ) -> AsyncIterator[RequestOutput]:
        """Submit and yield outputs; abandoning the iterator aborts the request."""
        async with self.submit(prompt_ids, params, **options) as stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe); its slot is freed at the engine's next step."""
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # ----------------------------------------------------------------- engine thread
    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._submit_lock:
                    self._unadmitted -= 1
                    # The bound was checked at submit; never refuse here.
                    self.scheduler.waiting.append(item)
            else:
                self.scheduler.abort(item)

    def _run(self) -> None:
        logger.info("engine thread started (%s)", self.model_name)
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self.metrics.set_queue(0, 0)
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                try:
                    self.scheduler.step()
                except Exception as exc:  # keep serving: fail the batch, not the thread
                    logger.exception("engine step failed")
                    self.scheduler.abort_all(f"engine step failed: {exc}")
            self._drain_inbox()
            self.scheduler.abort_all("engine stopped")
        logger.info("engine thread stopped (%s)", self.model_name)
