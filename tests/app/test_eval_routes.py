"""``/api/eval/runs`` end to end: real MiniLM, real Chroma and BM25, a tiny BEIR folder.

A run is started over HTTP (TestClient), polled until it ends, and its metrics,
report and plots are read back; bad dataset names, unknown datasets, bad
configurations and another tenant's requests are refused with the right 4xx.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.main import create_app
from llm_backend import ChatResponse, ScriptedBackend
from tests.app.conftest import make_settings
from tests.eval.beir_fixtures import write_beir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("eval-api")
    datasets = data_dir / "datasets"
    write_beir(datasets / "tiny")
    write_beir(datasets / "broken", qrels=[("q1", "missing-doc", 1)])
    settings = make_settings(data_dir, rate_limit_per_minute=10_000, eval_datasets_dir=datasets)
    app = create_app(settings, backend=ScriptedBackend([ChatResponse("unused")]), embedder=embedder)
    _, key_a = create_key(app.state.ragloom.db, "acme")
    _, key_b = create_key(app.state.ragloom.db, "globex")
    with TestClient(app) as client:
        yield {
            "client": client,
            "a": {"Authorization": f"Bearer {key_a}"},
            "b": {"Authorization": f"Bearer {key_b}"},
        }


def wait_run(client: TestClient, run_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """Poll a run until it ends (at most 300 s)."""
    deadline = time.monotonic() + 300
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/api/eval/runs/{run_id}", headers=headers)
        assert response.status_code == 200, response.text
        run = response.json()
        if run["status"] in ("succeeded", "failed"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"eval run {run_id} did not finish: {run}")


@pytest.fixture(scope="module")
def finished(env: dict[str, Any]) -> dict[str, Any]:
    """Tenant acme's finished run over 'tiny' with a BM25 and a dense configuration."""
    client, a = env["client"], env["a"]
    body = {"dataset": "tiny", "split": "test", "configs": {"bm25": "bm25", "dense": "dense,k=10"}}
    response = client.post("/api/eval/runs", json=body, headers=a)
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["id"].startswith("eval_")
    assert started["status"] in ("queued", "running", "succeeded")
    return wait_run(client, started["id"], a)


def test_run_succeeds_with_metrics_report_and_plots(finished: dict[str, Any]) -> None:
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["error"] is None
    assert set(finished["metrics"]) == {"bm25", "dense"}
    # five judged queries on twelve distinct topics: both retrievers find nearly all
    for name in ("bm25", "dense"):
        assert 0.8 <= finished["metrics"][name]["ndcg@10"] <= 1.0
    assert finished["progress"]["stage"] == "config:dense"
    assert finished["progress"]["done"] == finished["progress"]["total"] == 5
    assert "bm25" in finished["report"] and "ndcg@10" in finished["report"]
    assert finished["finished_at"] >= finished["created_at"]
    assert "metrics" in finished["plots"]
    assert finished["plots"]["metrics"] == f"/api/eval/runs/{finished['id']}/plots/metrics.png"


def test_plot_url_serves_png(env: dict[str, Any], finished: dict[str, Any]) -> None:
    client, a = env["client"], env["a"]
    for url in finished["plots"].values():
        response = client.get(url, headers=a)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    # a file of the run folder that is not one of its plots is not served
    missing = client.get(f"/api/eval/runs/{finished['id']}/plots/report.png", headers=a)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "plot_not_found"


def test_list_shows_only_own_runs(env: dict[str, Any], finished: dict[str, Any]) -> None:
    client = env["client"]
    mine = client.get("/api/eval/runs", headers=env["a"]).json()["data"]
    assert [r["id"] for r in mine] == [finished["id"]]
    assert mine[0]["dataset"] == "tiny"
    assert mine[0]["configs"] == {"bm25": "bm25", "dense": "dense,k=10"}
    assert client.get("/api/eval/runs", headers=env["b"]).json()["data"] == []


def test_other_tenant_gets_404(env: dict[str, Any], finished: dict[str, Any]) -> None:
    client, b = env["client"], env["b"]
    run = client.get(f"/api/eval/runs/{finished['id']}", headers=b)
    assert run.status_code == 404
    assert run.json()["error"]["code"] == "eval run_not_found"
    plot = client.get(finished["plots"]["metrics"], headers=b)
    assert plot.status_code == 404


def test_needs_a_key(env: dict[str, Any]) -> None:
    assert env["client"].get("/api/eval/runs").status_code == 401


@pytest.mark.parametrize("name", ["../tiny", "a/b", "..", "tiny\x00", "/etc", "ti\\ny", ".hidden"])
def test_bad_dataset_name_is_422(env: dict[str, Any], name: str) -> None:
    body = {"dataset": name, "configs": {"bm25": "bm25"}}
    response = env["client"].post("/api/eval/runs", json=body, headers=env["a"])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_dataset_name"


def test_unknown_dataset_is_404(env: dict[str, Any]) -> None:
    body = {"dataset": "scifact", "configs": {"bm25": "bm25"}}
    response = env["client"].post("/api/eval/runs", json=body, headers=env["a"])
    assert response.status_code == 404
    assert "scifact" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"dataset": "tiny", "configs": {"x": "sparse"}}, "invalid_config", "mode"),
        ({"dataset": "tiny", "configs": {"x": "bm25,k=ten"}}, "invalid_config", "whole number"),
        ({"dataset": "tiny", "configs": {"x": "bm25,colour=red"}}, "invalid_config", "colour"),
        (
            {"dataset": "tiny", "configs": {"x": "dense,embedding_model=/tmp/m"}},
            "invalid_config",
            "embedding_model",
        ),
        ({"dataset": "tiny", "configs": {"a b": "bm25"}}, "invalid_config", "a b"),
        ({"dataset": "tiny", "split": "../x", "configs": {"x": "bm25"}}, "invalid_split", "../x"),
        ({"dataset": "tiny", "split": "dev", "configs": {"x": "bm25"}}, "invalid_dataset", "dev"),
        ({"dataset": "broken", "configs": {"x": "bm25"}}, "invalid_dataset", "missing-doc"),
    ],
)
def test_bad_request_is_422(
    env: dict[str, Any], body: dict[str, Any], code: str, words: str
) -> None:
    response = env["client"].post("/api/eval/runs", json=body, headers=env["a"])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    assert str(env["client"].app.state.eval_runs.datasets_dir) not in error["message"]


def test_empty_configs_is_422(env: dict[str, Any]) -> None:
    body = {"dataset": "tiny", "configs": {}}
    response = env["client"].post("/api/eval/runs", json=body, headers=env["a"])
    assert response.status_code == 422


def test_restart_marks_unfinished_runs_failed(env: dict[str, Any]) -> None:
    from app.services.eval_runs import EvalRun, EvalRunService

    service = env["client"].app.state.eval_runs
    with service.db.session() as s:
        s.add(EvalRun(id="eval_stale", tenant="acme", dataset="tiny", split="test", configs={}))
    EvalRunService(service.settings, service.db, service.embedder).close()
    run = env["client"].get("/api/eval/runs/eval_stale", headers=env["a"]).json()
    assert run["status"] == "failed"
    assert "restarted" in run["error"]
