"""Retrieval metrics through pytrec_eval, in BEIR's shapes, without BEIR's traps.

* The caller's run is never mutated: scoring works on a fresh copy.
* ``mrr@10`` is the reciprocal rank over the top 10 only (pytrec_eval's
  ``recip_rank`` looks at the whole list), so the run is cut to 10 first, using
  trec_eval's own ordering (score descending, ties by document id descending).
* A judged query that the run does not answer at all scores 0 on every metric,
  rather than silently disappearing from the mean.

Example:
    >>> qrels = {"q1": {"d1": 1}}
    >>> run = {"q1": {"d2": 0.9, "d1": 0.5}}
    >>> evaluate_run(qrels, run).means["mrr@10"]
    0.5
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytrec_eval

from eval.errors import EvalError

logger = logging.getLogger(__name__)

NDCG_CUTOFFS = (1, 3, 5, 10)
RECALL_CUTOFFS = (1, 5, 10, 100)
MRR_CUTOFF = 10
RECALL_CURVE_CUTOFFS = (1, 2, 3, 5, 10, 20, 30, 50, 100)

RETRIEVAL_METRICS: tuple[str, ...] = (
    *(f"ndcg@{k}" for k in NDCG_CUTOFFS),
    *(f"recall@{k}" for k in RECALL_CUTOFFS),
    f"mrr@{MRR_CUTOFF}",
    "map",
)
"""The metric names a retrieval run reports, in report order."""

LOWER_IS_BETTER = frozenset(
    {
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_mean_ms",
        "refusal_rate",
        "judge_unparseable",
        "label_unparsed_rate",
        "num_errors",
    }
)
"""Metric names where a smaller value is better (for best-value marking and gates)."""


@dataclass(slots=True)
class RetrievalScores:
    """Scores of one run against qrels.

    Attributes:
        per_query: ``qid -> {metric name: value}`` for every judged query.
        means: ``metric name -> mean over judged queries``.
        recall_curve: ``k -> mean recall@k`` for the recall@k plot.
        unanswered: Judged query ids that had no documents in the run (scored 0).
    """

    per_query: dict[str, dict[str, float]]
    means: dict[str, float]
    recall_curve: dict[int, float]
    unanswered: list[str]


def ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """Documents best first, in trec_eval's order (score desc, then doc id desc)."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def truncate_run(run: Mapping[str, Mapping[str, float]], depth: int) -> dict[str, dict[str, float]]:
    """A new run keeping each query's top ``depth`` documents; the input is untouched."""
    if depth < 1:
        raise EvalError(f"truncation depth must be >= 1, got {depth}")
    return {qid: dict(ranked(docs)[:depth]) for qid, docs in run.items()}


def _clean_run(run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """A deep copy with str ids and finite float scores (pytrec_eval is strict about types)."""
    clean: dict[str, dict[str, float]] = {}
    for qid, docs in run.items():
        row: dict[str, float] = {}
        for doc_id, score in docs.items():
            value = float(score)
            if math.isnan(value):
                raise EvalError(f"run has a NaN score for query {qid!r}, document {doc_id!r}")
            row[str(doc_id)] = value
        clean[str(qid)] = row
    return clean


def _clean_qrels(qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in qrels.items()}


def _pytrec(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: set[str]
) -> dict[str, dict[str, float]]:
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    return evaluator.evaluate(run)  # type: ignore[no-any-return]


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    curve_cutoffs: Sequence[int] = RECALL_CURVE_CUTOFFS,
) -> RetrievalScores:
    """Score ``run`` against ``qrels`` with pytrec_eval.

    Args:
        qrels: ``qid -> {doc_id: grade}``; grades above 1 count as graded relevance in nDCG.
        run: ``qid -> {doc_id: score}``; higher scores rank first. Not modified.
        curve_cutoffs: The k values of the recall@k curve.

    Returns:
        Per-query and mean ``ndcg@1/3/5/10``, ``recall@1/5/10/100``, ``mrr@10`` and
        ``map``, plus the recall curve.

    Raises:
        EvalError: empty qrels or a NaN score.
    """
    judged = _clean_qrels(qrels)
    if not judged:
        raise EvalError("qrels are empty: nothing to evaluate")
    full = _clean_run(run)
    # Only judged queries count; unjudged ones in the run are ignored as BEIR does.
    full = {qid: docs for qid, docs in full.items() if qid in judged}
    top = truncate_run(full, MRR_CUTOFF)
    curve_ks = sorted(set(curve_cutoffs) | set(RECALL_CUTOFFS))
    main = _pytrec(
        judged,
        full,
        {
            "ndcg_cut." + ",".join(str(k) for k in NDCG_CUTOFFS),
            "recall." + ",".join(str(k) for k in curve_ks),
            "map",
        },
    )
    mrr = _pytrec(judged, top, {"recip_rank"})

    per_query: dict[str, dict[str, float]] = {}
    curve_rows: dict[str, dict[int, float]] = {}
    unanswered: list[str] = []
    for qid in sorted(judged):
        if qid not in main:
            unanswered.append(qid)
        got = main.get(qid, {})
        row = {f"ndcg@{k}": float(got.get(f"ndcg_cut_{k}", 0.0)) for k in NDCG_CUTOFFS}
        row.update({f"recall@{k}": float(got.get(f"recall_{k}", 0.0)) for k in RECALL_CUTOFFS})
        row[f"mrr@{MRR_CUTOFF}"] = float(mrr.get(qid, {}).get("recip_rank", 0.0))
        row["map"] = float(got.get("map", 0.0))
        per_query[qid] = row
        curve_rows[qid] = {k: float(got.get(f"recall_{k}", 0.0)) for k in curve_ks}
    if unanswered:
        logger.warning("%d judged queries have no results in the run; scored 0", len(unanswered))
    means = {name: _mean(row[name] for row in per_query.values()) for name in RETRIEVAL_METRICS}
    curve = {k: _mean(rows[k] for rows in curve_rows.values()) for k in sorted(set(curve_cutoffs))}
    return RetrievalScores(
        per_query=per_query, means=means, recall_curve=curve, unanswered=unanswered
    )


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return float(sum(items) / len(items)) if items else 0.0


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """``latency_p50_ms``, ``latency_p95_ms`` and ``latency_mean_ms`` (linear interpolation)."""
    if not latencies_ms:
        return {"latency_p50_ms": 0.0, "latency_p95_ms": 0.0, "latency_mean_ms": 0.0}
    values = np.asarray(latencies_ms, dtype=float)
    return {
        "latency_p50_ms": float(np.percentile(values, 50)),
        "latency_p95_ms": float(np.percentile(values, 95)),
        "latency_mean_ms": float(values.mean()),
    }
