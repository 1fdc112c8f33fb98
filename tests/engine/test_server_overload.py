"""A full waiting queue answers 503 with an OpenAI error body (one slot, queue of one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from llm_backend.engine.async_engine import AsyncEngine
from llm_backend.engine.loader import LoadedModel
from llm_backend.engine.scheduler import SchedulerConfig
from tests.engine.test_server import MODEL, Served, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a story."}],
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
}


@pytest.fixture(scope="module")
def tiny_queue(smollm2_int8: LoadedModel) -> Iterator[Served]:
    config = SchedulerConfig(max_running=1, max_waiting=1)
    yield from serve(AsyncEngine(smollm2_int8, model_name=MODEL, config=config).start())


def test_full_queue_returns_503_then_recovers(tiny_queue: Served) -> None:
    url = f"{tiny_queue.base_url}/v1/chat/completions"
    engine = tiny_queue.engine
    stop = threading.Event()

    def hold(first_line: threading.Event) -> None:
        with httpx.Client(timeout=120) as http, http.stream("POST", url, json=SLOW) as response:
            for _ in response.iter_lines():
                first_line.set()
                if stop.is_set():
                    return

    started = [threading.Event(), threading.Event()]
    holders = [threading.Thread(target=hold, args=(event,), daemon=True) for event in started]
    holders[0].start()
    assert started[0].wait(60)
    holders[1].start()  # waits for the only slot
    deadline = time.monotonic() + 30
    while engine.num_waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.num_running == 1

    response = httpx.post(url, json={**SLOW, "stream": False, "max_tokens": 4}, timeout=30)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "engine_overloaded" and "max_waiting=1" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}

    stop.set()  # both holders disconnect; the engine must drain and accept again
    for thread in holders:
        thread.join(60)
    deadline = time.monotonic() + 30
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "aborted requests still hold the engine"
        time.sleep(0.05)
    body = {**SLOW, "stream": False, "max_tokens": 3, "ignore_eos": False}
    ok = httpx.post(url, json=body, timeout=60)
    assert ok.status_code == 200, ok.text
