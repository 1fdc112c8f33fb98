"""Prometheus metrics of one engine, in its own registry (several engines may coexist).

The scheduler thread calls the ``on_*`` hooks; ``/metrics`` renders ``exposition()``.
``prometheus_client`` metrics are thread-safe.

Example:
    >>> metrics = EngineMetrics(model_name="smollm2-135m")
    >>> metrics.on_tokens(3)
    >>> b"ragloom_engine_generation_tokens_total" in metrics.exposition()
    True
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_WINDOW_S = 5.0


class EngineMetrics:
    """Queue depth, running requests, token counters, tokens/s, TTFT, prefix-cache hits.

    Args:
        model_name: Value of the ``model`` label on every series.
    """

    def __init__(self, model_name: str = "model") -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]
        self._model = model_name
        self.queue_depth = Gauge(
            "ragloom_engine_queue_depth",
            "Requests waiting for a KV-cache slot.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.running = Gauge(
            "ragloom_engine_running_requests",
            "Requests holding a KV-cache slot.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            "ragloom_engine_generation_tokens",
            "Tokens generated.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "ragloom_engine_prompt_tokens",
            "Prompt tokens admitted (cached or computed).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.prefill_tokens = Counter(
            "ragloom_engine_prefill_tokens",
            "Prompt tokens computed by prefill forwards (padding excluded).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.prefix_cache_hit_tokens = Counter(
            "ragloom_engine_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of prefill.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.tokens_per_second = Gauge(
            "ragloom_engine_generation_tokens_per_second",
            f"Generated tokens per second over the last {_RATE_WINDOW_S:.0f} s.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self.ttft = Histogram(
            "ragloom_engine_time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.queue_time = Histogram(
            "ragloom_engine_queue_time_seconds",
            "Seconds a request waited for a slot.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self._finished = Counter(
            "ragloom_engine_requests_finished",
            "Finished requests by finish reason.",
            [*labels, "reason"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()

    def set_queue(self, waiting: int, running: int) -> None:
        """Current waiting and running request counts."""
        self.queue_depth.set(waiting)
        self.running.set(running)

    def on_admit(self, prompt_tokens: int, cached_tokens: int, queue_seconds: float) -> None:
        """A request got a slot; ``cached_tokens`` of its prompt came from the prefix cache."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_hit_tokens.inc(cached_tokens)
        self.queue_time.observe(queue_seconds)

    def on_prefill(self, tokens: int) -> None:
        """A prefill forward computed ``tokens`` prompt tokens."""
        self.prefill_tokens.inc(tokens)

    def on_first_token(self, seconds: float) -> None:
        """Time to first token of one request."""
        self.ttft.observe(seconds)

    def on_tokens(self, count: int) -> None:
        """``count`` tokens were generated; updates the tokens/s gauge."""
        self.generation_tokens.inc(count)
        self._update_rate(count)

    def _update_rate(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            if count:
                self._recent.append((now, count))
            while self._recent and now - self._recent[0][0] > _RATE_WINDOW_S:
                self._recent.popleft()
            total = sum(c for _, c in self._recent)
            span = max(now - self._recent[0][0], 1.0) if self._recent else 1.0
        self.tokens_per_second.set(total / span)

    def on_finish(self, reason: str) -> None:
        """A request ended with ``reason`` (stop, length, abort, error)."""
        self._finished.labels(self._model, reason).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (tokens/s decays when idle)."""
        self._update_rate(0)
        return generate_latest(self.registry)
