"""CLI command: ``ragloom ui [--port 8501] [--host 127.0.0.1]``, the Streamlit chat UI.

Runs ``streamlit run ui/streamlit_app.py`` headless with usage statistics off.
The UI finds the API through ``RAGLOOM_UI__API_URL`` (default
http://127.0.0.1:8000) and ``RAGLOOM_UI__API_KEY``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail

logger = logging.getLogger(__name__)


def entry_file() -> Path:
    """The UI's Streamlit entry script (found through the installed ``ui`` package)."""
    import importlib.util

    spec = importlib.util.find_spec("ui")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ragloom 'ui' package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "streamlit_app.py"


def streamlit_command(entry: Path, host: str, port: int, max_upload_mb: int = 50) -> list[str]:
    """The ``streamlit run`` command line: headless, no telemetry, no file watcher.

    ``max_upload_mb`` caps each uploaded file in the browser (the API's default limit).
    """
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(entry),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--server.maxUploadSize",
        str(max_upload_mb),
    ]


def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run the Streamlit chat UI (it calls the REST API at RAGLOOM_UI__API_URL)."""
    if not 0 < port < 65536:
        fail(f"--port must be in 1..65535, got {port}")
    try:
        entry = entry_file()
    except FileNotFoundError as exc:
        fail(str(exc))
    if not entry.is_file():
        fail(f"the UI entry file {entry} is missing; reinstall ragloom")
    command = streamlit_command(entry, host, port)
    api_url = os.environ.get("RAGLOOM_UI__API_URL", "http://127.0.0.1:8000")
    typer.echo(f"ragloom UI on http://{host}:{port} (API: {api_url})", err=True)
    logger.info("running %s", " ".join(command))
    sys.stderr.flush()
    # Become the Streamlit process: signals (Ctrl-C, SIGTERM) reach it directly.
    os.execv(sys.executable, command)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("ui")(ui)
