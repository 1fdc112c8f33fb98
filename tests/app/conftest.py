"""Shared fixtures of the API tests: settings in a temp data folder, the real MiniLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import ApiSettings, Settings
from retrieval import SentenceTransformerEmbedder

FAQ = """# Refunds

Refunds are paid back to the original card within 5 business days.
A refund needs the order number and the receipt.

# Shipping

Parcels ship from the Rotterdam warehouse with DHL. Delivery takes two days.
"""

PETS = """# Pet policy

Guests may bring one dog or cat per room for a fee of 25 euros per night.
Aquariums are not allowed in the rooms.
"""


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for every API test."""
    model = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    model.warm_up()
    return model


def make_settings(data_dir: Path, **api: Any) -> Settings:
    """Settings over ``data_dir`` with API overrides."""
    return Settings(data_dir=data_dir, api=ApiSettings(**api))


def parse_sse(lines: Iterator[str]) -> list[tuple[str, Any]]:
    """``(event, data)`` pairs of an SSE stream (data JSON-decoded unless ``[DONE]``)."""
    events: list[tuple[str, Any]] = []
    name, data = "message", list[str]()
    for line in lines:
        if line.startswith(":"):
            continue
        if not line.strip():
            if data:
                raw = "\n".join(data)
                events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
            name, data = "message", list[str]()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        raw = "\n".join(data)
        events.append((name, raw if raw == "[DONE]" else json.loads(raw)))
    return events


def wait_job(client: httpx.Client, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """Poll a job until it ends (at most 120 s)."""
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")
