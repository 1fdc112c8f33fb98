"""End to end in a real browser: ``ragloom serve`` (our engine on SmolLM2, Chroma, MiniLM),
``ragloom ui`` (Streamlit), and Debian's headless Chromium driven by Playwright.

Upload a Markdown file about an invented fact, wait for its ingestion job, ask
about it, and check that the answer streams in and that a source names the file.
A screenshot lands in ``artifacts/ui_e2e_chat.png``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.eval.beir_fixtures import write_beir
from tests.ui.conftest import FACT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


def _ragloom() -> str:
    return str(Path(sys.executable).with_name("ragloom"))


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url} server exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer in {timeout_s:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def wait_idle(page: Any) -> None:
    """Wait until the Streamlit page has connected and its script run has ended."""
    page.wait_for_selector('[data-testid="stMain"]', state="attached")
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]')"
    )
    time.sleep(0.3)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API (real engine, auth off) and the UI on free loopback ports; yields the UI URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from app.settings import get_settings
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.registry import resolve_model

    try:
        resolve_model("smollm2-135m", get_settings().models_dir)
    except EngineError as exc:
        pytest.skip(f"SmolLM2 is not available ({exc}); run `ragloom models pull smollm2-135m`")
    tmp = tmp_path_factory.mktemp("e2e")
    write_beir(tmp / "data" / "eval-datasets" / "tiny")
    api_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAGLOOM_DATA_DIR": str(tmp / "data"),
        "RAGLOOM_API__AUTH": "off",
        "RAGLOOM_AGENT__BACKEND": "engine",
        "RAGLOOM_ENGINE__MODEL": "smollm2-135m",
        "RAGLOOM_AGENT__MIN_SCORE": "0",
        "RAGLOOM_AGENT__MAX_ANSWER_TOKENS": "48",
        "RAGLOOM_UI__API_URL": f"http://127.0.0.1:{api_port}",
        "RAGLOOM_UI__TIMEOUT_S": "120",
    }
    env.pop("RAGLOOM_UI__API_KEY", None)
    api_log, ui_log = tmp / "api.log", tmp / "ui.log"
    api = _start([_ragloom(), "serve", "--port", str(api_port)], env, api_log)
    ui = _start([_ragloom(), "ui", "--port", str(ui_port)], env, ui_log)
    try:
        _wait_http(f"http://127.0.0.1:{ui_port}/_stcore/health", ui, ui_log, 90)
        _wait_http(f"http://127.0.0.1:{api_port}/health", api, api_log, 240)
        yield f"http://127.0.0.1:{ui_port}"
    finally:
        _stop(ui)
        _stop(api)


def test_upload_ask_and_see_a_streamed_answer_with_its_source(servers: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    doc = tmp_path / "zorblat.md"
    doc.write_text(FACT)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            # Documents: create a collection, upload the file, wait for the job.
            page.goto(f"{servers}/documents")
            wait_idle(page)
            page.get_by_label("Name").fill("e2e")
            page.get_by_label("Name").press("Enter")  # submits the form
            expect(page.get_by_text("This collection has no documents yet.")).to_be_visible(
                timeout=60_000  # the first collection may wait for the embedding model
            )
            page.locator("input[type=file]").set_input_files(str(doc))
            expect(page.get_by_text("zorblat.md")).to_be_visible()
            wait_idle(page)
            page.get_by_role("button", name="Upload and index").click()
            expect(page.get_by_text("Indexed 1 of 1 file(s)")).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Documents (1)")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "ui_e2e_documents.png"), full_page=True)

            # Chat: ask about the invented fact, watch the answer grow.
            page.get_by_role("link", name="Chat").click()
            wait_idle(page)
            box = page.get_by_placeholder("Ask a question")
            box.fill("When is the Zorblat festival held?")
            box.press("Enter")
            answer = page.locator('[data-testid="stChatMessage"]').nth(1)
            lengths: list[int] = []
            deadline = time.monotonic() + 180
            sources = page.get_by_text("Zorblat festival", exact=False).locator(
                "xpath=ancestor::*[@data-testid='stExpander']"
            )
            while time.monotonic() < deadline:
                if answer.count():
                    text = answer.inner_text()
                    if not lengths or len(text) != lengths[-1]:
                        lengths.append(len(text))
                    if sources.count():
                        break
                time.sleep(0.05)
            assert sources.count(), "no source expander naming the uploaded document"
            # After the answer the page redraws: the new session is listed in the sidebar.
            sidebar = page.locator('[data-testid="stSidebar"]')
            expect(
                sidebar.get_by_role("button", name="When is the Zorblat festival held?")
            ).to_be_visible()
            expect(page.locator('[data-testid="stStatusWidgetRunningIcon"]')).to_have_count(0)
            page.screenshot(path=str(ARTIFACTS / "ui_e2e_chat.png"), full_page=True)
            assert len([n for n in lengths if n > 0]) >= 3, f"answer did not stream: {lengths}"
            expander_text = sources.first.inner_text()
            assert "upload:zorblat.md" in expander_text, expander_text
            answer_text = answer.inner_text()
            assert len(answer_text.split()) >= 3, answer_text
            assert page.locator('[data-testid="stException"]').count() == 0
            images = page.eval_on_selector_all("img", "els => els.map(e => e.src)")
            assert all(src.startswith((servers, "data:")) for src in images), images
        finally:
            browser.close()


def test_evaluation_run_in_the_browser(servers: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{servers}/evaluation")
            wait_idle(page)
            page.get_by_label("Dataset (a BEIR folder of the server)").fill("tiny")
            page.get_by_role("button", name="Start").click()
            deadline = time.monotonic() + 180
            while not page.get_by_role("heading", name="Metrics").count():
                assert time.monotonic() < deadline, "the eval run did not finish"
                refresh = page.get_by_role("button", name="Refresh")
                if refresh.count():
                    refresh.click()
                time.sleep(1)
            expect(page.locator('[data-testid="stImage"] img').first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "ui_e2e_evaluation.png"), full_page=True)
            assert page.locator('[data-testid="stException"]').count() == 0
            # Every image on the page comes from the UI server itself, none from elsewhere.
            sources = page.eval_on_selector_all("img", "els => els.map(e => e.src)")
            assert sources and all(src.startswith(servers) for src in sources), sources
        finally:
            browser.close()
