"""Metrics cross-checked against values computed by hand."""

from __future__ import annotations

import copy
import math

import pytest

from eval.errors import EvalError
from eval.metrics import evaluate_run, latency_summary, ranked, truncate_run

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)

QRELS = {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2, "d4": 1}}
RUN = {
    "q1": {"d5": 0.9, "d1": 0.8, "d6": 0.7, "d2": 0.6},
    "q2": {"d4": 0.9, "d3": 0.5},
}


def test_hand_computed_binary_query() -> None:
    scores = evaluate_run(QRELS, RUN).per_query["q1"]
    # ranks: d5 (0), d1 (1), d6 (0), d2 (1); two relevant documents
    assert scores["ndcg@1"] == 0.0
    assert scores["ndcg@3"] == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))
    assert scores["ndcg@5"] == pytest.approx((1 / LOG2_3 + 1 / LOG2_5) / (1 + 1 / LOG2_3))
    assert scores["recall@1"] == 0.0
    assert scores["recall@5"] == 1.0
    assert scores["mrr@10"] == 0.5
    assert scores["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_hand_computed_graded_query() -> None:
    scores = evaluate_run(QRELS, RUN).per_query["q2"]
    # d4 (grade 1) ranked above d3 (grade 2): trec_eval's nDCG uses gain = grade
    assert scores["ndcg@1"] == pytest.approx(1 / 2)
    assert scores["ndcg@3"] == pytest.approx((1 + 2 / LOG2_3) / (2 + 1 / LOG2_3))
    assert scores["recall@1"] == 0.5
    assert scores["mrr@10"] == 1.0
    assert scores["map"] == 1.0


def test_means_average_over_all_judged_queries_and_missing_ones_score_zero() -> None:
    qrels = {**QRELS, "q3": {"d9": 1}}
    result = evaluate_run(qrels, RUN)
    assert result.unanswered == ["q3"]
    assert result.per_query["q3"]["ndcg@10"] == 0.0
    q1, q2 = result.per_query["q1"], result.per_query["q2"]
    assert result.means["mrr@10"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result.means["ndcg@3"] == pytest.approx((q1["ndcg@3"] + q2["ndcg@3"]) / 3)


def test_mrr_at_10_ignores_hits_below_rank_10() -> None:
    run = {"q": {f"n{i:02d}": 1.0 - i / 100 for i in range(10)} | {"rel": 0.5}}
    scores = evaluate_run({"q": {"rel": 1}}, run).per_query["q"]
    assert scores["mrr@10"] == 0.0  # pytrec_eval's recip_rank would give 1/11
    assert scores["recall@100"] == 1.0
    assert scores["map"] == pytest.approx(1 / 11)


def test_ties_follow_trec_eval_order_in_truncation() -> None:
    # equal scores: trec_eval ranks the larger doc id first, so "z" takes rank 1
    assert [d for d, _ in ranked({"a": 1.0, "z": 1.0, "m": 2.0})] == ["m", "z", "a"]
    run = {"q": {f"d{i:02d}": 1.0 for i in range(12)}}
    kept = truncate_run(run, 10)["q"]
    assert sorted(kept) == [f"d{i:02d}" for i in range(2, 12)]
    # d00 and d01 fall off the top 10 under trec_eval's order, so a hit there is no MRR@10
    assert evaluate_run({"q": {"d01": 1}}, run).per_query["q"]["mrr@10"] == 0.0
    assert evaluate_run({"q": {"d11": 1}}, run).per_query["q"]["mrr@10"] == 1.0


def test_scoring_never_mutates_the_callers_run() -> None:
    qrels = {"q1": {"q1": 1, "d1": 1}}
    run = {"q1": {"q1": 0.99, "d1": 0.5, "d2": 0.4}, "unjudged": {"d1": 0.1}}
    before = copy.deepcopy(run)
    evaluate_run(qrels, run)
    truncate_run(run, 1)
    assert run == before


def test_nan_score_and_empty_qrels_are_refused() -> None:
    with pytest.raises(EvalError, match="NaN"):
        evaluate_run(QRELS, {"q1": {"d1": float("nan")}})
    with pytest.raises(EvalError, match="empty"):
        evaluate_run({}, RUN)


def test_recall_curve_is_monotone_and_matches_cutoffs() -> None:
    curve = evaluate_run(QRELS, RUN).recall_curve
    assert curve[1] == pytest.approx((0.0 + 0.5) / 2)
    assert curve[2] == pytest.approx((0.5 + 1.0) / 2)
    values = [curve[k] for k in sorted(curve)]
    assert values == sorted(values)


def test_latency_percentiles() -> None:
    summary = latency_summary([float(i) for i in range(1, 101)])
    assert summary["latency_p50_ms"] == pytest.approx(50.5)
    assert summary["latency_p95_ms"] == pytest.approx(95.05)
