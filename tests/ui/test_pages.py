"""The UI pages under Streamlit's AppTest, against the real API on loopback.

The API is real (uvicorn, Chroma, MiniLM, SQLite sessions); only the LLM is
scripted, so the answer text, its citation and its tool calls are known.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.ui.conftest import LiveApi, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT = 60


def page(name: str) -> AppTest:
    """An AppTest of one page module's ``render()``."""
    return AppTest.from_string(
        f"from ui.views.{name} import render\nrender()", default_timeout=TIMEOUT
    )


def all_text(at: AppTest) -> str:
    """Every markdown, caption and text element's value, joined."""
    parts: list[Any] = [m.value for m in at.markdown]
    parts += [c.value for c in at.caption] + [t.value for t in at.text]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("name", ["chat", "documents", "evaluation"])
def test_api_down_is_one_line_then_recovers(
    name: str, monkeypatch: pytest.MonkeyPatch, ui_env: LiveApi
) -> None:
    monkeypatch.setenv("RAGLOOM_UI__API_URL", f"http://127.0.0.1:{free_port()}")
    at = page(name)
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "Cannot reach the API" in at.error[0].value
    assert "\n" not in at.error[0].value
    # The API comes back: the Retry button reruns the page, which now works.
    monkeypatch.setenv("RAGLOOM_UI__API_URL", ui_env.url)
    at.button(key="retry_api").click().run()
    assert not at.exception and len(at.error) == 0


def test_slow_api_is_one_line(monkeypatch: pytest.MonkeyPatch, silent_server: str) -> None:
    monkeypatch.setenv("RAGLOOM_UI__API_URL", silent_server)
    monkeypatch.setenv("RAGLOOM_UI__TIMEOUT_S", "0.5")
    at = page("documents")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "did not answer in time" in at.error[0].value


def test_wrong_key_is_one_line_401(monkeypatch: pytest.MonkeyPatch, ui_env: LiveApi) -> None:
    monkeypatch.setenv("RAGLOOM_UI__API_KEY", "sk-not-a-key")
    at = page("chat")
    at.run()
    assert not at.exception
    assert len(at.error) == 1
    assert "401" in at.error[0].value and "RAGLOOM_UI__API_KEY" in at.error[0].value


def test_chat_streams_a_sanitized_answer_with_sources_and_a_session(ui_env: LiveApi) -> None:
    at = page("chat")
    at.run()
    assert not at.exception and not at.error
    assert at.sidebar.selectbox(key="chat_collection").value == "fest"
    at.sidebar.slider(key="chat_temperature").set_value(0.0)
    at.chat_input[0].set_value("When is the Zorblat festival?").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    text = all_text(at)
    assert "ninth of Brumaire" in text
    # Model text never renders an image or HTML tag.
    assert "![" not in text and "<img" not in text
    assert "\\[image: pixel\\]" in text
    sources = [e for e in at.expander if e.label.startswith("Sources")]
    assert sources, [e.label for e in at.expander]
    source_text = "\n".join(str(m.value) for m in sources[0].markdown)
    assert "[1] Zorblat festival" in source_text and "score" in source_text
    assert "Zorblat festival · Zorblat festival" not in source_text  # section = title: once
    assert any("ninth of Brumaire" in str(t.value) for t in sources[0].text)
    session_id = at.session_state["chat_session_id"]
    assert session_id
    # The page redrew after the answer: the new session is in the sidebar.
    assert at.sidebar.button(key=f"open_{session_id}").label.startswith("When is the Zorblat")
    assert ui_env.client.get(f"/api/sessions/{session_id}", headers=ui_env.headers).is_success

    # A new chat empties the page; the session list resumes the conversation.
    fresh = page("chat")
    fresh.run()
    fresh.button(key=f"open_{session_id}").click().run()
    assert not fresh.exception
    assert [m.name for m in fresh.chat_message] == ["user", "assistant"]
    resumed = all_text(fresh)
    assert "ninth of Brumaire" in resumed and "\\[image: pixel\\]" in resumed
    assert "![" not in resumed and "<img" not in resumed
    assert any(e.label.startswith("Sources") for e in fresh.expander)

    fresh.button(key=f"delete_{session_id}").click().run()
    assert not fresh.exception and not fresh.chat_message
    r = ui_env.client.get(f"/api/sessions/{session_id}", headers=ui_env.headers)
    assert r.status_code == 404


def test_agent_mode_shows_the_tool_trace(ui_env: LiveApi) -> None:
    at = page("chat")
    at.run()
    at.sidebar.radio(key="chat_mode").set_value("agent")
    at.chat_input[0].set_value("What is 6*7?").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "The calculator says 42." in all_text(at)
    traces = [e for e in at.expander if e.label.startswith("Tool trace")]
    assert traces
    assert "calculator" in "\n".join(str(m.value) for m in traces[0].markdown)
    assert any("42" in str(t.value) for t in traces[0].text)
    assert '"6*7"' in traces[0].code[0].value


def test_chat_error_is_one_line_and_the_page_goes_on(ui_env: LiveApi) -> None:
    at = page("chat")
    at.run()
    at.chat_input[0].set_value("x" * 9000).run()  # over the API's max_message_chars
    assert not at.exception
    assert len(at.error) == 1 and "8000" in at.error[0].value, [e.value for e in at.error]
    at.chat_input[0].set_value("When is the Zorblat festival?").run()
    assert not at.exception and not at.error
    assert "ninth of Brumaire" in all_text(at)


def test_documents_create_upload_with_file_errors_list_and_delete(ui_env: LiveApi) -> None:
    at = page("documents")
    at.run()
    assert not at.exception and not at.error
    at.text_input(key="docs_new_name").set_value("ui-docs")
    next(b for b in at.button if b.label == "Create collection").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="docs_collection").value == "ui-docs"
    assert "no documents yet" in all_text(at)

    at.file_uploader[0].set_value(
        [
            ("notes.md", b"# Notes\n\nThe blue kettle whistles at dawn.", "text/markdown"),
            ("broken.pdf", b"this is not a pdf", "application/pdf"),
        ]
    )
    at.run()
    at.button(key="docs_upload").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    outcome = [w.value for w in at.warning] + [s.value for s in at.success]
    assert any("Indexed 1 of 2 file(s)" in str(v) for v in outcome), outcome
    assert any(str(t.value).startswith("broken.pdf: ") for t in at.text), [t.value for t in at.text]
    assert "Notes" in all_text(at) and "Documents (1)" in [s.value for s in at.subheader]
    listed = httpx.get(
        f"{ui_env.url}/api/collections/ui-docs/documents", headers=ui_env.headers
    ).json()["data"]
    assert len(listed) == 1

    at.button(key=f"docs_delete_{listed[0]['doc_id']}").click().run()
    assert not at.exception and "Documents (0)" in [s.value for s in at.subheader]

    at.checkbox(key="docs_confirm_ui-docs").check().run()
    at.button(key="docs_delete_collection").click().run()
    assert not at.exception
    names = [
        c["name"]
        for c in ui_env.client.get("/api/collections", headers=ui_env.headers).json()["data"]
    ]
    assert "ui-docs" not in names


def test_documents_duplicate_collection_is_one_line(ui_env: LiveApi) -> None:
    at = page("documents")
    at.run()
    at.text_input(key="docs_new_name").set_value("fest")
    next(b for b in at.button if b.label == "Create collection").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "fest" in at.error[0].value


def test_evaluation_start_a_run_see_metrics_plots_and_report(ui_env: LiveApi) -> None:
    at = page("evaluation")
    at.run()
    assert not at.exception and not at.error
    assert "No evaluation runs yet" in at.info[0].value
    at.text_input(key="eval_dataset").set_value("tiny")
    at.text_area(key="eval_configs").set_value("bm25=bm25\ndense=dense,k=10")
    at.button(key="FormSubmitter:eval_new-Start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run_id = at.selectbox(key="eval_run").value
    assert run_id and run_id.startswith("eval_")
    deadline = time.monotonic() + 180
    while "Metrics" not in [s.value for s in at.subheader]:
        assert time.monotonic() < deadline, "the eval run did not finish"
        assert not at.exception and not at.warning, [w.value for w in at.warning]
        time.sleep(0.5)
        at.run()
    table = at.dataframe[-1].value
    assert sorted(table["config"]) == ["bm25", "dense"]
    assert any(c.lower().startswith("ndcg") for c in table.columns), list(table.columns)
    assert len(at.image) >= 1  # the run's own PNG plots, fetched through the API
    report = [e for e in at.expander if e.label == "Report"]
    assert report and "![" not in str(report[0].markdown[0].value)


def test_evaluation_bad_configs_and_unknown_dataset_are_one_line(ui_env: LiveApi) -> None:
    at = page("evaluation")
    at.run()
    at.text_input(key="eval_dataset").set_value("tiny")
    at.text_area(key="eval_configs").set_value("no equals sign")
    at.button(key="FormSubmitter:eval_new-Start").click().run()
    assert len(at.error) == 1 and "name=mode" in at.error[0].value
    at.text_input(key="eval_dataset").set_value("no-such-dataset")
    at.text_area(key="eval_configs").set_value("bm25=bm25")
    at.button(key="FormSubmitter:eval_new-Start").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "no-such-dataset" in at.error[0].value


def test_evaluation_page_explains_itself_without_eval_routes(
    monkeypatch: pytest.MonkeyPatch, api_without_eval: str
) -> None:
    monkeypatch.setenv("RAGLOOM_UI__API_URL", api_without_eval)
    at = page("evaluation")
    at.run()
    assert not at.exception and not at.error
    assert "retrieval evaluation runs" in at.info[0].value
    assert "404" in all_text(at)


def test_parse_configs() -> None:
    from ui.views.evaluation import parse_configs

    assert parse_configs("# comment\n hyb = hybrid,bm25_weight=0.6\n\nbm25=bm25") == {
        "hyb": "hybrid,bm25_weight=0.6",
        "bm25": "bm25",
    }
    for bad in ("", "x", "=bm25", "a=", "a=bm25\na=dense"):
        with pytest.raises(ValueError):
            parse_configs(bad)


def test_evaluation_table_from_runs() -> None:
    from ui.views.evaluation import flatten_run

    row = flatten_run(
        {"id": "r1", "configs": {"a": "bm25", "b": "dense"}, "progress": {"done": 2}, "x": [1]}
    )
    assert row == {"id": "r1", "configs": "a=bm25; b=dense", "progress.done": 2}
