"""Run folders: metrics.json, per_query.jsonl, TREC runs, report.md, plots, gates, compare."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from eval.configs import parse_config
from eval.errors import ConfigError, EvalError, RunFolderError
from eval.gates import check_gates, parse_gate
from eval.metrics import evaluate_run, latency_summary
from eval.report import paired_test, render_comparison, render_report, write_report
from eval.results import ConfigResult, RunResult, load_run, read_trec_run

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1, "d4": 1}}
GOOD = {"q1": {"d1": 0.9, "d9": 0.1}, "q2": {"d2": 0.8, "d1": 0.2}, "q3": {"d3": 0.7, "d4": 0.6}}
WEAK = {"q1": {"d9": 0.9, "d1": 0.1}, "q2": {"d2": 0.8}, "q3": {"d8": 0.7, "d4": 0.6}}


def _config(name: str, run: dict[str, dict[str, float]], latency: list[float]) -> ConfigResult:
    scores = evaluate_run(QRELS, run)
    return ConfigResult(
        name=name,
        spec={"mode": name},
        metrics={**scores.means, **latency_summary(latency)},
        per_query=[{"qid": q, **m} for q, m in scores.per_query.items()],
        run=run,
        recall_curve=scores.recall_curve,
    )


def _result() -> RunResult:
    return RunResult(
        kind="retrieval",
        configs=[_config("weak", WEAK, [5.0, 6.0, 7.0]), _config("good", GOOD, [9.0, 10.0, 30.0])],
        info={"dataset": "tiny", "split": "test"},
        wall_time_s=1.5,
        baseline="weak",
    )


def test_run_folder_layout_and_round_trip(tmp_path: Path) -> None:
    result = _result()
    out = tmp_path / "run"
    write_report(result, out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["weak", "good"]
    assert metrics["good"]["ndcg@10"] == 1.0
    assert metrics["weak"]["mrr@10"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert metrics["weak"]["latency_p50_ms"] == 6.0

    rows = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {(r["config"], r["qid"]) for r in rows} == {
        (c, q) for c in ("weak", "good") for q in QRELS
    }

    trec_lines = (out / "runs" / "weak.trec").read_text().splitlines()
    assert trec_lines[0] == "q1 Q0 d9 1 0.9 weak"
    assert trec_lines[1] == "q1 Q0 d1 2 0.1 weak"
    assert read_trec_run(out / "runs" / "good.trec") == GOOD

    for name in ("metrics.png", "per_query_distribution.png", "recall_curve.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200  # a real, non-trivial PNG

    loaded = load_run(out)
    assert loaded.metrics == result.metrics
    assert loaded.baseline == "weak"
    assert loaded.config("good").recall_curve == result.config("good").recall_curve
    assert loaded.config("weak").run == WEAK


def test_report_marks_best_per_column_and_deltas() -> None:
    text = render_report(_result())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| config |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    good_row = next(line for line in lines if line.startswith("| `good` |"))
    weak_row = next(line for line in lines if line.startswith("| `weak` |"))
    good = [c.strip() for c in good_row.strip("|").split("|")]
    weak = [c.strip() for c in weak_row.strip("|").split("|")]
    ndcg = columns.index("ndcg@10")
    assert good[ndcg] == "**1.0000**" and not weak[ndcg].startswith("**")
    p95 = columns.index("latency_p95_ms")  # lower is better: weak wins
    assert weak[p95] == "**6.9**" and good[p95] == "28.0"
    assert "## Delta against baseline `weak`" in text
    delta_section = text.split("## Delta against baseline")[1]
    delta_row = next(line for line in delta_section.splitlines() if line.startswith("| `good`"))
    cells = [c.strip() for c in delta_row.strip("|").split("|")]
    expected = 1.0 - _result().config("weak").metrics["mrr@10"]
    assert cells[columns.index("mrr@10")] == f"+{expected:.4f}"


def test_baseline_must_exist_and_names_unique() -> None:
    with pytest.raises(EvalError, match="baseline 'nope'"):
        RunResult(kind="retrieval", configs=_result().configs, baseline="nope")
    config = _result().configs[0]
    with pytest.raises(EvalError, match="unique"):
        RunResult(kind="retrieval", configs=[config, config])


def test_gates() -> None:
    result = _result()
    assert check_gates(result, [parse_gate("ndcg@10=0.5")]) == []
    failures = check_gates(result, [parse_gate("ndcg@10=0.9")])
    assert [f.config for f in failures] == ["weak"]
    assert check_gates(result, [parse_gate("good:ndcg@10=0.9")]) == []
    # latency gates are upper bounds
    failures = check_gates(result, [parse_gate("latency_p95_ms=10")])
    assert [f.config for f in failures] == ["good"]
    with pytest.raises(ConfigError, match="no metric 'ndcg@7'"):
        check_gates(result, [parse_gate("ndcg@7=0.5")])
    with pytest.raises(ConfigError, match="configuration 'zzz'"):
        check_gates(result, [parse_gate("zzz:ndcg@10=0.5")])
    for bad in ("ndcg@10", "ndcg@10=high", "=0.3"):
        with pytest.raises(ConfigError):
            parse_gate(bad)


def test_compare_two_runs(tmp_path: Path) -> None:
    first = RunResult(kind="retrieval", configs=[_config("hyb", WEAK, [1.0])])
    second = RunResult(kind="retrieval", configs=[_config("hyb", GOOD, [1.0])])
    write_report(first, tmp_path / "a")
    write_report(second, tmp_path / "b")
    text = render_comparison(load_run(tmp_path / "a"), load_run(tmp_path / "b"), "a", "b")
    assert "| ndcg@10 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| mrr@10 |"))
    assert row.split("|")[4].strip() == f"+{1.0 - 2 / 3:.4f}"
    assert "B better on 2, worse on 0 of 3 queries" in text
    test = paired_test(first.configs[0], second.configs[0], "ndcg@10")
    assert test is not None and 0 < test.p_value <= 1


def test_compare_refuses_unrelated_runs(tmp_path: Path) -> None:
    a = RunResult(kind="retrieval", configs=[_config("x", WEAK, [1.0]), _config("y", GOOD, [1])])
    b = RunResult(kind="retrieval", configs=[_config("z", WEAK, [1.0]), _config("w", GOOD, [1])])
    with pytest.raises(EvalError, match="share no configuration"):
        render_comparison(a, b, "a", "b")
    with pytest.raises(RunFolderError, match="run folder not found"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match=r"metrics\.json: not found"):
        load_run(tmp_path / "empty")


def test_parse_config() -> None:
    config = parse_config("hyb=hybrid,bm25_weight=0.6,dense_weight=0.4,rerank=yes,k=150")
    assert config.mode == "hybrid" and config.rerank is True
    assert (config.bm25_weight, config.dense_weight, config.k, config.fetch_k) == (
        0.6,
        0.4,
        150,
        300,
    )
    assert config.spec()["bm25_weight"] == 0.6
    small = parse_config("small=dense,chunk_size=128,chunk_overlap=16")
    assert small.index_params != parse_config("d=dense").index_params
    assert parse_config("b=bm25,k=50").index_params == parse_config("d=dense").index_params
    for bad, message in (
        ("hyb", "NAME=MODE"),
        ("x=sparse", "mode must be one of"),
        ("x=bm25,colour=red", "unknown option 'colour'"),
        ("x=bm25,k=ten", "k must be a whole number"),
        ("x=bm25,rerank=maybe", "rerank must be true or false"),
        ("x=bm25,k=0", "k must be >= 1"),
        ("x=dense,chunk_size=64,chunk_overlap=64", "chunk_overlap"),
        ("bad/name=bm25", "configuration name"),
        ("x=bm25,k=5,k=6", "given twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config(bad)
