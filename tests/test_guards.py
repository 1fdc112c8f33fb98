"""The suite's own guards and the package import rules."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ExternalNetworkBlocked

ROOT = Path(__file__).resolve().parents[1]


def test_external_connection_is_refused() -> None:
    with socket.socket() as s, pytest.raises(ExternalNetworkBlocked):
        s.connect(("192.0.2.1", 80))  # TEST-NET-1, never routed


def test_loopback_connection_is_allowed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket() as client:
            client.connect(server.getsockname())
            conn, _ = server.accept()
            conn.close()


def test_import_direction_contracts_hold() -> None:
    """retrieval/llm_backend never import agents/app/ui; ui imports none of the others."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: " in result.stdout and " broken" in result.stdout
    assert "0 broken" in result.stdout
