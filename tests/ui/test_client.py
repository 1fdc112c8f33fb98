"""The UI's API client against the real API on loopback, a closed port and a silent server."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from tests.ui.conftest import LiveApi, free_port
from ui.client import ApiClient, ApiError, SseEvent, iter_sse
from ui.settings import UiSettings

pytestmark = [pytest.mark.integration]


def _client(url: str, key: str | None = None, timeout_s: float = 10.0) -> ApiClient:
    secret = SecretStr(key) if key is not None else None
    return ApiClient(UiSettings(api_url=url, api_key=secret, timeout_s=timeout_s))


def test_iter_sse_parses_events_comments_and_multiline_data() -> None:
    lines = [
        ": ping",
        "event: token",
        'data: {"text": "Hel"}',
        "",
        "event: token",
        'data: {"text": "lo"}',
        "",
        "event: weird",
        "data: line one",
        "data: line two",
        "",
        'data: {"last": true}',
    ]
    assert list(iter_sse(lines)) == [
        SseEvent("token", {"text": "Hel"}),
        SseEvent("token", {"text": "lo"}),
        SseEvent("weird", "line one\nline two"),
        SseEvent("message", {"last": True}),
    ]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGLOOM_UI__API_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("RAGLOOM_UI__API_KEY", "sk-test")
    settings = UiSettings()
    assert settings.api_url == "http://127.0.0.1:9/"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "sk-test"
    assert "sk-test" not in repr(settings)
    assert ApiClient(settings).base_url == "http://127.0.0.1:9"


def test_closed_port_is_one_friendly_line() -> None:
    client = _client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ApiError) as info:
        client.collections()
    assert info.value.code == "unreachable"
    assert "Cannot reach the API" in info.value.message and "\n" not in info.value.message
    with pytest.raises(ApiError, match="Cannot reach the API"):
        list(client.chat_stream("hello", mode="llm"))


def test_slow_api_times_out_with_a_message(silent_server: str) -> None:
    client = _client(silent_server, timeout_s=0.5)
    with pytest.raises(ApiError) as info:
        client.sessions()
    assert info.value.code == "timeout"
    assert "did not answer in time" in info.value.message


def test_missing_and_wrong_keys_are_401_with_advice(live_api: LiveApi) -> None:
    for key in (None, "sk-wrong"):
        with pytest.raises(ApiError) as info:
            _client(live_api.url, key).collections()
        assert info.value.status == 401
        assert "RAGLOOM_UI__API_KEY" in info.value.message


def test_collections_documents_and_errors(live_api: LiveApi) -> None:
    client = _client(live_api.url, live_api.key)
    assert "fest" in [c["name"] for c in client.collections()]
    client.create_collection("scratch-client")
    with pytest.raises(ApiError) as info:
        client.create_collection("scratch-client")
    assert info.value.status == 409 and "scratch-client" in info.value.message
    job_id = client.upload(
        "scratch-client",
        [
            ("a.md", b"# A\n\nAlpha text about apples.", "text/markdown"),
            ("b.xyz", b"\x00\x01", None),
        ],
    )
    job = client.job(job_id)
    for _ in range(600):
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
        job = client.job(job_id)
    by_name = {f["filename"]: f for f in job["files"]}
    assert by_name["a.md"]["status"] != "failed", job
    assert by_name["b.xyz"]["status"] == "failed" and by_name["b.xyz"]["error"], job
    docs = client.documents("scratch-client")
    assert len(docs) == 1 and docs[0]["source"].endswith("a.md"), docs
    client.delete_document("scratch-client", docs[0]["doc_id"])
    assert client.documents("scratch-client") == []
    client.delete_collection("scratch-client")
    with pytest.raises(ApiError) as info:
        client.documents("scratch-client")
    assert info.value.status == 404
    with pytest.raises(ApiError, match="at least one file"):
        client.upload("fest", [])


def test_chat_stream_events_then_session_history(live_api: LiveApi) -> None:
    client = _client(live_api.url, live_api.key)
    events = list(
        client.chat_stream(
            "When is the Zorblat festival?",
            mode="rag",
            collection="fest",
            sampling={"temperature": 0.0, "max_tokens": 64, "top_p": None},
        )
    )
    names = [e.event for e in events]
    assert names.count("token") > 1 and names[-1] == "done", names
    text = "".join(e.data["text"] for e in events if e.event == "token")
    assert "ninth of Brumaire" in text
    citations = next(e.data["citations"] for e in events if e.event == "citations")
    assert citations and citations[0]["title"] == "Zorblat festival"
    session_id = events[-1].data["session_id"]
    assert session_id in [s["id"] for s in client.sessions()]
    detail = client.session(session_id)
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
    client.delete_session(session_id)
    with pytest.raises(ApiError) as info:
        client.session(session_id)
    assert info.value.status == 404


def test_chat_stream_agent_mode_has_tool_events(live_api: LiveApi) -> None:
    client = _client(live_api.url, live_api.key)
    events = list(client.chat_stream("What is 6*7?", mode="agent"))
    calls = [e.data for e in events if e.event == "tool_call"]
    results = [e.data for e in events if e.event == "tool_result"]
    assert calls and calls[0]["name"] == "calculator"
    assert results and "42" in str(results[0]["result"])


def test_chat_errors_before_the_stream_are_api_errors(live_api: LiveApi) -> None:
    client = _client(live_api.url, live_api.key)
    with pytest.raises(ApiError) as info:
        list(client.chat_stream("hi", mode="rag", collection="no-such-collection"))
    assert info.value.status == 404 and "no-such-collection" in info.value.message


def test_eval_runs_is_none_when_the_api_has_no_eval_routes(api_without_eval: str) -> None:
    assert _client(api_without_eval).eval_runs() is None
    with pytest.raises(ApiError) as info:
        _client(api_without_eval).collections()
    assert info.value.status == 404 and "not found" in info.value.message


def test_eval_runs_lists_runs(live_api: LiveApi) -> None:
    runs = _client(live_api.url, live_api.key).eval_runs()
    assert isinstance(runs, list)
    with pytest.raises(ApiError) as info:
        _client(live_api.url, live_api.key).eval_run("eval_missing")
    assert info.value.status == 404
    with pytest.raises(ApiError, match="outside the API"):
        _client(live_api.url, live_api.key).plot("http://tracker.invalid/p.png")
