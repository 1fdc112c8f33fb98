"""Real servers on loopback for the API tests: the engine (subprocess) and the API (uvicorn)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

MODEL = "smollm2-135m"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path() -> Path:
    """The SmolLM2 GGUF, or skip with how to get it."""
    from app.settings import get_settings
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.registry import resolve_model

    try:
        return resolve_model(MODEL, get_settings().models_dir)
    except EngineError as exc:
        pytest.skip(f"{MODEL} is not available here ({exc}); run `ragloom models pull {MODEL}`")


@contextmanager
def engine_server(max_batch: int = 4) -> Iterator[str]:
    """``ragloom engine serve`` on a free loopback port; yields its /v1 URL."""
    port = free_port()
    ragloom = Path(sys.executable).with_name("ragloom")
    command = [str(ragloom), "engine", "serve", "--model", str(model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch)]
    command += ["--max-seq-len", "2048", "--served-model-name", MODEL]
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                err = server.stderr.read().decode() if server.stderr else ""
                pytest.fail(f"engine server exited with {server.returncode}: {err[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("engine server did not start in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def api_server(app: FastAPI) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port (in a thread); yields its URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
