"""``ragloom ask``: real collection, errors as one line, text and JSON output."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.cli import ask as ask_module
from app.settings import get_settings
from llm_backend import ChatResponse, ScriptedBackend, ToolCall
from tests.agents.collection import COLLECTION, shared_embedder

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def env(helpcentre_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RAGLOOM_DATA_DIR", str(helpcentre_data_dir))
    get_settings.cache_clear()
    real_open = ask_module.open_retriever

    def open_with_shared_model(*args: Any, **kwargs: Any) -> Any:
        retriever = real_open(*args, **kwargs)
        retriever.embedder = shared_embedder()  # the same model, loaded once for the suite
        return retriever

    monkeypatch.setattr(ask_module, "open_retriever", open_with_shared_model)
    monkeypatch.setattr(ask_module, "web_client_factory", lambda timeout: OfflineDdgs())
    yield helpcentre_data_dir
    get_settings.cache_clear()


class OfflineDdgs:
    """Fails as ddgs does without a network (tests never contact the internet)."""

    def text(self, query: str, max_results: int = 5) -> list[dict[str, Any]]:
        raise ConnectionError("network is unreachable")


def scripted(monkeypatch: pytest.MonkeyPatch, responses: list[ChatResponse]) -> ScriptedBackend:
    backend = ScriptedBackend(responses, chunk_size=4)
    monkeypatch.setattr(ask_module, "build_backend", lambda *args: backend)
    return backend


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["ask", *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unknown_collection_is_one_line(env: Path) -> None:
    result = run("hello?", "--collection", "nope")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "'nope'" in result.stderr


def test_unknown_collection_without_any_data_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAGLOOM_DATA_DIR", str(tmp_path / "empty"))
    get_settings.cache_clear()
    result = run("hello?", "--collection", "docs")
    get_settings.cache_clear()
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: collection 'docs' does not exist (no data in {tmp_path / 'empty'})\n"
    )


def test_backend_down_is_one_line(env: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run(
        "How do I cancel?", "--collection", COLLECTION, "--backend", "openai", "--base-url", url
    )
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and url in result.stderr


def test_bad_k_and_empty_question(env: Path) -> None:
    assert (
        run("q", "--collection", COLLECTION, "-k", "0").stderr == "error: -k must be >= 1, got 0\n"
    )
    assert run("  ", "--collection", COLLECTION).stderr == "error: the question is empty\n"


def test_rag_streams_answer_then_citations(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [ChatResponse("Cancel within 14 days for a full refund [1].")])
    result = run("Can I cancel within 14 days?", "--collection", COLLECTION, "-k", "3")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Cancel within 14 days for a full refund [1]."
    assert "Citations:" in lines
    assert any(line.startswith("  [1] Refunds and cancellations (") for line in lines)


def test_rag_json_output(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [ChatResponse("Full refund within 14 days [1][2].")])
    result = run("Can I cancel within 14 days?", "--collection", COLLECTION, "--json")
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["answer"] == "Full refund within 14 days [1][2]."
    assert [c["number"] for c in body["citations"]] == [1, 2]
    first = body["citations"][0]
    assert {"doc_id", "source", "page", "section", "snippet"} <= set(first)
    assert first["source"].endswith("refunds.md")
    assert body["tool_calls"] == [] and body["refused"] is False
    assert len(body["sources"]) == 5  # settings.agent.k


def test_rag_off_topic_is_refused_without_an_llm(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = scripted(monkeypatch, [])
    result = run("Who won the 1998 football world cup?", "--collection", COLLECTION, "--json")
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["refused"] is True and body["citations"] == []
    assert "do not contain" in body["answer"]
    assert backend.requests == []


def test_agent_json_has_the_tool_trace(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(
        monkeypatch,
        [
            ChatResponse(
                "",
                [ToolCall("c1", "knowledge_base_search", '{"query": "cancel minimum term"}')],
                "tool_calls",
            ),
            ChatResponse(
                "", [ToolCall("c2", "calculator", '{"expression": "12 * 30"}')], "tool_calls"
            ),
            ChatResponse("Cancelling costs at most 120 EUR [1]; a year is 360 EUR."),
        ],
    )
    result = run(
        "What does cancelling cost?", "--collection", COLLECTION, "--mode", "agent", "--json"
    )
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    names = [c["name"] for c in body["tool_calls"]]
    assert names == ["knowledge_base_search", "calculator"]
    assert body["tool_calls"][1] == {
        "name": "calculator",
        "arguments": {"expression": "12 * 30"},
        "result": "360",
        "error": False,
    }
    assert body["tool_calls"][0]["result"].startswith("[1] ")
    assert [c["number"] for c in body["citations"]] == [1]
    assert body["citations"][0]["source"] == body["sources"][0]["source"]


def test_agent_text_output_shows_trace(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(
        monkeypatch,
        [
            ChatResponse("", [ToolCall("c1", "web_search", '{"query": "news"}')], "tool_calls"),
            ChatResponse("No web access."),
        ],
    )
    monkeypatch.setenv("RAGLOOM_AGENT__WEB_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    result = run("Any news?", "--collection", COLLECTION, "--mode", "agent")
    assert result.exit_code == 0, result.stderr
    assert "No web access." in result.stdout
    assert "Tool calls:" in result.stdout
    assert "  1. web_search" in result.stdout and "(error)" in result.stdout
    assert "web search unavailable: network is unreachable" in result.stdout
