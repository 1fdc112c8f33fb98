"""``ragloom ui``: the Streamlit command line, a bad port, and a real start on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.cli.ui import entry_file, streamlit_command
from tests.ui.conftest import free_port

RAGLOOM = str(Path(sys.executable).with_name("ragloom"))


def test_streamlit_command_is_headless_without_telemetry() -> None:
    entry = entry_file()
    assert entry.name == "streamlit_app.py" and entry.is_file()
    command = streamlit_command(entry, "127.0.0.1", 8600)
    pairs = dict(zip(command[5::2], command[6::2], strict=True))
    assert command[1:5] == ["-m", "streamlit", "run", str(entry)]
    assert pairs["--server.headless"] == "true"
    assert pairs["--browser.gatherUsageStats"] == "false"
    assert pairs["--server.address"] == "127.0.0.1" and pairs["--server.port"] == "8600"


def test_bad_port_is_a_one_line_error() -> None:
    result = subprocess.run(
        [RAGLOOM, "ui", "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --port must be in 1..65535, got 70000"


@pytest.mark.integration
@pytest.mark.slow
def test_ragloom_ui_serves_the_app_on_loopback() -> None:
    port = free_port()
    env = {**os.environ, "RAGLOOM_UI__API_URL": f"http://127.0.0.1:{free_port()}"}
    process = subprocess.Popen(
        [RAGLOOM, "ui", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "streamlit did not start in 90 s"
            time.sleep(0.5)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<title>" in page.text
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # ``ragloom ui`` became the Streamlit process (exec), so nothing is left behind.
    assert process.returncode is not None
