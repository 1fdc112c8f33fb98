"""Run tensor work on a short-lived thread, so that no long-lived thread keeps an
OpenMP worker pool beside the engine's.

PyTorch's CPU kernels run their parallel regions on OpenMP (libgomp). Each thread
that starts a parallel region gets a worker pool of its own, kept until that thread
exits. Once the process holds more such workers than CPUs, libgomp stops spinning
while its workers wait, so every parallel region in every thread pays a futex
wake-up (~45 us here, against ~2 when spinning) and a decode step has hundreds of
them. Measured on the 2-core Zen 4 kind: SmolLM2 int4 compiled decode at 130 tok/s
with the engine's thread the only pool owner, 44 tok/s with one idle pool left in
the thread that imported the engine or loaded the model. In a process that also runs
retrieval (the API with the in-process engine), embedding and reranking follow the
same rule (``retrieval.embedding``, ``retrieval.rerank``): ~0.1 ms per call.

Torch-free and cheap to import (``llm_backend``'s own import is light), so both the
engine and retrieval use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_on_fresh_thread(work: Callable[[], T], name: str = "ragloom-tensor-work") -> T:
    """``work()`` on a new thread, joined; its result, or its exception re-raised.

    The calling thread starts no parallel region, so it gets no OpenMP pool, and the
    new thread's pool ends with it.

    Example:
        >>> loaded = run_on_fresh_thread(lambda: load_model(path), name="load")
    """
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
