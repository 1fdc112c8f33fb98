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

from app.cli._common import fail

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
    from app.settings import Settings

    return Settings()


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
    from eval.report import write_report
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
        with _progress_bars(progress) as callback:
            result = runner.run(progress=callback)
        write_report(result, out)
    except EvalError as exc:
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
