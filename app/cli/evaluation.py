"""CLI commands: ``ragloom eval retrieval | answers | compare``.

Exit codes: 0 success, 1 bad input or a failed run (one-line error), 3 a
``--fail-below`` gate was not met (each failure printed on stderr).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from app.cli._common import fail, load_settings

if TYPE_CHECKING:
    from app.settings import Settings
    from eval.results import RunResult

GATE_FAILED_EXIT = 3

eval_app = typer.Typer(
    name="eval",
    help="Evaluate retrieval (BEIR) and answers; compare runs.",
    no_args_is_help=True,
)


def _settings() -> Settings:
    return load_settings()


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar per stage."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="it", leave=True)
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def _apply_gates(result: RunResult, gates: list[str]) -> None:
    from eval.errors import EvalError
    from eval.gates import check_gates, parse_gate

    if not gates:
        return
    try:
        failures = check_gates(result, [parse_gate(g) for g in gates])
    except EvalError as exc:
        fail(str(exc))
    for failure in failures:
        typer.echo(f"gate failed: {failure}", err=True)
    if failures:
        raise typer.Exit(GATE_FAILED_EXIT)
    typer.echo(f"all {len(gates)} gates passed", err=True)


def _check_gate_syntax(gates: list[str]) -> None:
    """Refuse a malformed gate before the (long) run starts."""
    from eval.errors import EvalError
    from eval.gates import parse_gate

    for gate in gates:
        try:
            parse_gate(gate)
        except EvalError as exc:
            fail(str(exc))


def _summary(result: RunResult, out: Path) -> None:
    from eval.report import format_value, metric_columns

    columns = [c for c in metric_columns(result.configs) if not c.endswith("mean_ms")]
    typer.echo(" ".join(["config".ljust(12), *(c.rjust(max(8, len(c))) for c in columns)]))
    for config in result.configs:
        cells = [format_value(c, config.metrics.get(c)).rjust(max(8, len(c))) for c in columns]
        typer.echo(" ".join([config.name.ljust(12), *cells]))
    typer.echo(f"wall time {result.wall_time_s:.1f}s; report: {out / 'report.md'}")


@eval_app.command("retrieval")
def retrieval_command(
    dataset: Path = typer.Option(..., "--dataset", help="BEIR folder (corpus, queries, qrels/)."),
    out: Path = typer.Option(..., "--out", help="Output folder of the run."),
    config: list[str] = typer.Option(
        ...,
        "--config",
        help="NAME=MODE[,key=value...], e.g. hyb=hybrid,bm25_weight=0.6 (repeatable).",
    ),
    split: str = typer.Option("test", "--split", help="Qrels split: qrels/<split>.tsv."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="Configuration the report's deltas refer to (default: first)."
    ),
    baseline_run: Path | None = typer.Option(
        None, "--baseline-run", help="An earlier run folder: also write comparison.md against it."
    ),
    fail_below: list[str] = typer.Option(
        [], "--fail-below", help="Gate [CONFIG:]METRIC=VALUE, e.g. ndcg@10=0.65 (repeatable)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Index cache (default: $RAGLOOM_DATA_DIR/eval-cache)."
    ),
    max_queries: int | None = typer.Option(
        None, "--max-queries", help="Evaluate only the first N judged queries."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Evaluate retriever configurations on a BEIR dataset and write a report folder."""
    from eval.configs import parse_config
    from eval.errors import EvalError
    from eval.report import COMPARISON_FILE, render_comparison, write_report
    from eval.results import load_run
    from eval.retrieval_runner import RetrievalEvalRunner

    _check_gate_syntax(fail_below)
    settings = _settings()
    defaults = {
        "chunk_size": settings.retrieval.chunk_size,
        "chunk_overlap": settings.retrieval.chunk_overlap,
        "embedding_model": settings.retrieval.embedding_model,
    }
    if settings.retrieval.reranker_model:
        defaults["reranker_model"] = settings.retrieval.reranker_model
    cache = cache_dir or settings.data_dir / "eval-cache"
    try:
        configs = [parse_config(text, defaults) for text in config]
        runner = RetrievalEvalRunner(
            dataset, configs, cache, split=split, baseline=baseline, max_queries=max_queries
        )
        previous = load_run(baseline_run) if baseline_run is not None else None
        with _progress_bars(progress) as callback:
            result = runner.run(progress=callback)
        write_report(result, out)
        if previous is not None:
            comparison = render_comparison(previous, result, str(baseline_run), str(out))
            (out / COMPARISON_FILE).write_text(comparison, encoding="utf-8")
    except EvalError as exc:
        fail(str(exc))
    _summary(result, out)
    if baseline_run is not None:
        typer.echo(f"comparison with {baseline_run}: {out / COMPARISON_FILE}")
    _apply_gates(result, fail_below)


EVAL_AGENT_TOOLS = ["knowledge_base_search", "calculator"]
"""Tools of the agent under evaluation: no web search, so runs are reproducible and local."""


def _answer_fn(mode: str, retriever: Any, backend: Any, settings: Settings) -> Any:
    """The RAG answerer or the agent over a recording wrapper of ``retriever``."""
    from agents import AgentProfile, RagAnswerer, RagConfig, ToolAgent, default_registry
    from eval.answer_runner import agent_answer_fn, rag_answer_fn, recording_retriever
    from llm_backend import ChatBackendModel, SamplingOptions

    config = settings.agent
    recorder = recording_retriever(retriever)
    if mode == "rag":
        rag = RagAnswerer(
            recorder,
            backend,
            RagConfig(
                k=retriever.k,
                min_score=config.min_score,
                on_low_score=config.on_low_score,
                max_answer_tokens=config.max_answer_tokens,
            ),
        )
        return rag_answer_fn(rag, recorder)
    profile = AgentProfile(
        name="eval",
        tools=EVAL_AGENT_TOOLS,
        max_steps=config.max_steps,
        tool_timeout_s=config.tool_timeout_s,
        max_tool_output_chars=config.max_tool_output_chars,
        require_tool_first=True,
    )
    model = ChatBackendModel(
        backend=backend,
        sampling=SamplingOptions(temperature=0.0, max_tokens=config.max_answer_tokens),
    )
    agent = ToolAgent(model, default_registry(recorder), profile)
    return agent_answer_fn(agent, recorder)


@eval_app.command("answers")
def answers_command(
    qa: Path = typer.Option(
        ..., "--qa", help="JSONL of questions with references/labels/gold ids."
    ),
    collection: str = typer.Option(..., "--collection", "-c", help="Collection to answer from."),
    out: Path = typer.Option(..., "--out", help="Output folder of the run."),
    mode: str = typer.Option("rag", "--mode", help="rag | agent"),
    name: str | None = typer.Option(None, "--name", help="Configuration name (default: mode)."),
    backend: str | None = typer.Option(
        None, "--backend", help="engine | openai (default: settings)."
    ),
    base_url: str | None = typer.Option(None, "--base-url", help="OpenAI-compatible server URL."),
    model: str | None = typer.Option(
        None, "--model", help="Served model name or GGUF/registry name."
    ),
    k: int | None = typer.Option(None, "-k", help="Chunks to retrieve (default: settings)."),
    retrieval: str = typer.Option("hybrid", "--retrieval", help="bm25 | dense | hybrid"),
    judge: bool = typer.Option(False, "--judge/--no-judge", help="Grade faithfulness with an LLM."),
    judge_base_url: str | None = typer.Option(
        None, "--judge-base-url", help="Judge's OpenAI-compatible URL (default: the answerer's)."
    ),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Judge's model."),
    max_questions: int | None = typer.Option(
        None, "--max-questions", help="Answer only the first N questions."
    ),
    fail_below: list[str] = typer.Option(
        [], "--fail-below", help="Gate METRIC=VALUE, e.g. label_accuracy=0.55 (repeatable)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Answer every question with the RAG answerer or the agent and score the answers."""
    from app.cli.ask import build_backend, open_retriever
    from eval.answer_runner import AnswerEvalRunner, load_qa
    from eval.errors import EvalError
    from eval.report import write_report
    from llm_backend.errors import BackendError
    from retrieval import RetrievalError

    if mode not in ("rag", "agent"):
        fail(f"--mode must be rag or agent, got {mode!r}")
    if retrieval not in ("bm25", "dense", "hybrid"):
        fail(f"--retrieval must be bm25, dense or hybrid, got {retrieval!r}")
    _check_gate_syntax(fail_below)
    settings = _settings()
    top_k = settings.agent.k if k is None else k
    if top_k < 1:
        fail(f"-k must be >= 1, got {top_k}")
    try:
        items = load_qa(qa)
        retriever = open_retriever(settings, collection, top_k, retrieval)
    except (EvalError, RetrievalError) as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"cannot open collection {collection!r}: {exc}")
    kind = backend or settings.agent.backend
    if kind not in ("engine", "openai"):
        fail(f"--backend must be engine or openai, got {kind!r}")
    try:
        chat = build_backend(settings, kind, base_url, model)
        grader = None
        if judge:
            if judge_base_url or judge_model:
                grader = build_backend(
                    settings,
                    "openai" if judge_base_url else kind,
                    judge_base_url or base_url,
                    judge_model or model,
                )
            else:
                grader = chat
    except Exception as exc:  # any backend construction failure becomes one line
        fail(f"cannot start the {kind} backend: {exc}")
    spec = {"mode": mode, "retrieval": retrieval, "k": top_k, "backend": kind}
    if model:
        spec["model"] = model
    try:
        runner = AnswerEvalRunner(
            items,
            _answer_fn(mode, retriever, chat, settings),
            name=name or mode,
            spec=spec,
            judge=grader,
            max_items=max_questions,
        )
        with _progress_bars(progress) as callback:
            result = runner.run(progress=callback)
        result.info.update(qa=str(qa), collection=collection)
        write_report(result, out)
    except (EvalError, BackendError, RetrievalError) as exc:
        fail(str(exc))
    _summary(result, out)
    _apply_gates(result, fail_below)


@eval_app.command("compare")
def compare_command(
    run_a: Path = typer.Argument(..., help="Run folder A (the reference)."),
    run_b: Path = typer.Argument(..., help="Run folder B (compared against A)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the comparison here."),
) -> None:
    """Compare two run folders configuration by configuration (B - A)."""
    from eval.errors import EvalError
    from eval.report import render_comparison
    from eval.results import load_run

    try:
        text = render_comparison(load_run(run_a), load_run(run_b), str(run_a), str(run_b))
    except EvalError as exc:
        fail(str(exc))
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command group to the main app."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    app.add_typer(eval_app, name="eval")
