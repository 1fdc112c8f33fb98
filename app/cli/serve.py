"""CLI command: ``ragloom serve [--host 127.0.0.1] [--port 8000]``, the REST API.

With ``RAGLOOM_API__AUTH=off`` (single-user local mode) the server refuses any
address but loopback: without keys, anyone who can reach it could use it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Annotated

import typer

from app.cli._common import fail, load_settings

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return all(ipaddress.ip_address(str(i[4][0])).is_loopback for i in infos)


def check_bind(host: str, auth: str) -> str | None:
    """Why the server must not start on ``host`` with this auth setting, or None."""
    if auth == "off" and not is_loopback(host):
        return (
            f"refusing to serve on {host} with RAGLOOM_API__AUTH=off: without API keys "
            "only a loopback address (127.0.0.1) is allowed; create keys with "
            "`ragloom keys create --tenant NAME` and turn auth on"
        )
    return None


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the REST API (chat, sessions, collections, search, OpenAI-compatible /v1)."""
    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    settings = load_settings()
    problem = check_bind(host, settings.api.auth)
    if problem:
        fail(problem)
    import uvicorn

    from app.main import create_app

    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("serve")(serve)
