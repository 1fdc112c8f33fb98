"""Prometheus metrics of the API: requests, latencies, TTFT, tokens, errors.

Each app gets its own ``CollectorRegistry`` (several apps can live in one
process, as in tests); ``GET /metrics`` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ApiMetrics:
    """The API's metric families, registered in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "ragloom_api_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ragloom_api_request_seconds",
            "Time to the response headers, by route.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ragloom_api_ttft_seconds",
            "Time from request to the first answer token, by mode.",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ragloom_api_generated_tokens_total",
            "Answer tokens streamed (backend usage when reported, else text pieces).",
            ["mode"],
            registry=r,
        )
        self.errors = Counter(
            "ragloom_api_errors_total", "Error responses and stream errors.", ["code"], registry=r
        )
        self.jobs = Counter(
            "ragloom_api_ingestion_jobs_total", "Ingestion jobs by outcome.", ["status"], registry=r
        )

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
