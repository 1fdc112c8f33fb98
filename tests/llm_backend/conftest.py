"""Shared fixtures: the loopback OpenAI wire server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.llm_backend.wire_server import ServerThread, WireState, build_app


@pytest.fixture(scope="session")
def wire_server() -> Iterator[tuple[str, WireState]]:
    """(base_url, state) of a real OpenAI-wire HTTP server on 127.0.0.1."""
    state = WireState()
    with ServerThread(build_app(state)) as server:
        yield f"http://127.0.0.1:{server.port}/v1", state
