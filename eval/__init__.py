"""ragloom evaluation: BEIR retrieval suites and answer suites, with reports and plots.

Public surface::

    from eval import RetrievalEvalRunner, load_beir, parse_config, write_report

    dataset = load_beir(Path("../shared/data/scifact-train"), split="train")
    configs = [parse_config("bm25=bm25"), parse_config("hyb=hybrid,bm25_weight=0.6")]
    result = RetrievalEvalRunner(dataset, configs, cache_dir=Path("/tmp/eval-cache")).run()
    write_report(result, Path("runs/scifact"))   # metrics.json, per_query.jsonl, runs/,
                                                 # report.md, *.png
    failures = check_gates(result, [parse_gate("ndcg@10=0.65")])

Answer suites: ``AnswerEvalRunner(load_qa(path), rag_answer_fn(answerer, recorder))``.
Shapes follow BEIR: corpus ``dict[id, {title, text}]``, qrels
``dict[qid, dict[doc_id, int]]``, run ``dict[qid, dict[doc_id, float]]``.
"""

from eval.answer_runner import (
    AnswerEvalRunner,
    AnswerOutcome,
    QAItem,
    agent_answer_fn,
    load_qa,
    rag_answer_fn,
    recording_retriever,
)
from eval.answers import (
    citation_scores,
    exact_match,
    extract_label,
    is_refusal,
    normalize_answer,
    parse_judge_score,
    token_f1,
)
from eval.configs import RetrieverConfig, parse_config
from eval.dataset import BeirDataset, load_beir
from eval.errors import ConfigError, DatasetError, EvalError, RunFolderError
from eval.gates import Gate, GateFailure, check_gates, parse_gate
from eval.metrics import RETRIEVAL_METRICS, evaluate_run, latency_summary, truncate_run
from eval.report import render_comparison, render_report, write_report
from eval.results import ConfigResult, RunResult, load_run, write_run
from eval.retrieval_runner import RetrievalEvalRunner

__all__ = [
    "RETRIEVAL_METRICS",
    "AnswerEvalRunner",
    "AnswerOutcome",
    "BeirDataset",
    "ConfigError",
    "ConfigResult",
    "DatasetError",
    "EvalError",
    "Gate",
    "GateFailure",
    "QAItem",
    "RetrievalEvalRunner",
    "RetrieverConfig",
    "RunFolderError",
    "RunResult",
    "agent_answer_fn",
    "check_gates",
    "citation_scores",
    "evaluate_run",
    "exact_match",
    "extract_label",
    "is_refusal",
    "latency_summary",
    "load_beir",
    "load_qa",
    "load_run",
    "normalize_answer",
    "parse_config",
    "parse_gate",
    "parse_judge_score",
    "rag_answer_fn",
    "recording_retriever",
    "render_comparison",
    "render_report",
    "token_f1",
    "truncate_run",
    "write_report",
    "write_run",
]
