"""Run tensor work on a short-lived thread (the same rule as ``llm_backend.engine.threads``).

PyTorch's CPU kernels parallelize with OpenMP (libgomp), which gives each thread that
starts a parallel region a worker pool of its own until that thread exits. In a
process that also runs our engine (the API with the in-process backend), a pool kept
by a request or ingestion thread makes libgomp stop spinning, and every parallel
region of the engine's decode steps then waits on a futex: SmolLM2 decode fell from
~110 to ~40 tok/s. Embedding and reranking therefore run on a fresh thread whose
pool ends with it (~0.1 ms per call).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_on_fresh_thread(work: Callable[[], T], name: str = "ragloom-embedding") -> T:
    """``work()`` on a new thread, joined; its result, or its exception re-raised."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
