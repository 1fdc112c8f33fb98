"""Shared fixtures: the loopback OpenAI wire server, and our engine on the real model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.llm_backend.wire_server import ServerThread, WireState, build_app

if TYPE_CHECKING:
    from llm_backend.local_engine import LocalEngineBackend

ENGINE_MODEL = "smollm2-135m"
ENGINE_CONTEXT = 2048


@pytest.fixture(scope="session")
def wire_server() -> Iterator[tuple[str, WireState]]:
    """(base_url, state) of a real OpenAI-wire HTTP server on 127.0.0.1."""
    state = WireState()
    with ServerThread(build_app(state)) as server:
        yield f"http://127.0.0.1:{server.port}/v1", state


def _models_dir() -> Path:
    env = os.environ.get("RAGLOOM_MODELS_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ragloom")) / "models"


@pytest.fixture(scope="session")
def local_engine() -> Iterator[LocalEngineBackend]:
    """Our engine on the real SmolLM2-135M GGUF (int8), in-process; loaded once."""
    import torch

    from llm_backend.engine.registry import pull_model
    from llm_backend.local_engine import LocalEngineBackend

    torch.set_num_threads(1)  # a shared 2-core machine: see tests/engine/conftest.py
    path = pull_model(ENGINE_MODEL, _models_dir())
    backend = LocalEngineBackend.from_model_path(
        path, model_name=ENGINE_MODEL, quant="int8", max_batch=4, max_seq_len=ENGINE_CONTEXT
    )
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def engine_server(local_engine: LocalEngineBackend) -> Iterator[str]:
    """The engine's own OpenAI server (``create_app``) over the same engine, on loopback."""
    from llm_backend.engine.server import create_app

    with ServerThread(create_app(local_engine.engine)) as server:
        yield f"http://127.0.0.1:{server.port}/v1"
