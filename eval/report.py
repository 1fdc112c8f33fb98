"""Markdown reports: a run's side-by-side table, and a comparison of two runs.

The run report marks the best value of each column in bold (the smallest for
latencies and other lower-is-better metrics) and gives each configuration's
delta against the baseline configuration. The comparison pairs the
configurations two runs share and adds, per pair, how many queries got better
or worse and a paired randomization test's p-value.

Example:
    >>> result = RetrievalEvalRunner(dataset, configs, cache_dir).run()
    >>> write_report(result, Path("runs/scifact"))   # report.md, metrics.json, plots
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.errors import EvalError
from eval.metrics import LOWER_IS_BETTER
from eval.results import ConfigResult, RunResult, write_run

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"


def metric_columns(configs: Sequence[ConfigResult]) -> list[str]:
    """Metric names in first-seen order across the configurations."""
    columns: list[str] = []
    for config in configs:
        for name in config.metrics:
            if name not in columns:
                columns.append(name)
    return columns


def format_value(metric: str, value: float | None) -> str:
    """Metrics with 4 decimals, milliseconds and seconds with 1, counts as integers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric.endswith("_ms") or metric.endswith("_s"):
        return f"{value:.1f}"
    if metric.startswith("num_") or metric.endswith("_count") or metric == "judge_unparseable":
        return str(round(value))
    return f"{value:.4f}"


def format_delta(metric: str, delta: float) -> str:
    """A signed delta, formatted like its metric."""
    sign = "+" if delta >= 0 else "-"
    return sign + format_value(metric, abs(delta))


def best_values(configs: Sequence[ConfigResult], columns: Sequence[str]) -> dict[str, float]:
    """Best value per column (max, or min for lower-is-better metrics)."""
    best: dict[str, float] = {}
    for column in columns:
        values = [c.metrics[column] for c in configs if column in c.metrics]
        values = [v for v in values if not math.isnan(v)]
        if values:
            best[column] = min(values) if column in LOWER_IS_BETTER else max(values)
    return best


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def render_report(result: RunResult) -> str:
    """The Markdown report of one run."""
    configs = result.configs
    columns = metric_columns(configs)
    best = best_values(configs, columns)
    lines = [f"# {result.kind.capitalize()} evaluation", ""]
    for key, value in result.info.items():
        if isinstance(value, str | int | float | bool) or value is None:
            lines.append(f"- {key}: {value}")
    lines.append(f"- wall time: {result.wall_time_s:.1f} s")
    lines.append(f"- configurations: {len(configs)}")
    lines.append("")
    lines.append("## Configurations")
    lines.append("")
    for config in configs:
        spec = ", ".join(f"{k}={v}" for k, v in config.spec.items())
        lines.append(f"- `{config.name}`: {spec or '(defaults)'}")
    lines.append("")
    lines.append("## Results")
    lines.append("")
    lines.append("Best value per column in **bold** (lowest for latencies and rates of failure).")
    lines.append("")
    rows = []
    for config in configs:
        row = [f"`{config.name}`"]
        for column in columns:
            value = config.metrics.get(column)
            text = format_value(column, value)
            if value is not None and column in best and math.isclose(value, best[column]):
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    lines.extend(_table(["config", *columns], rows))
    lines.append("")

    if result.baseline is not None and len(configs) > 1:
        base = result.config(result.baseline)
        lines.append(f"## Delta against baseline `{base.name}`")
        lines.append("")
        delta_rows = []
        for config in configs:
            if config.name == base.name:
                continue
            row = [f"`{config.name}`"]
            for column in columns:
                if column in config.metrics and column in base.metrics:
                    row.append(format_delta(column, config.metrics[column] - base.metrics[column]))
                else:
                    row.append("–")
            delta_rows.append(row)
        lines.extend(_table(["config", *columns], delta_rows))
        lines.append("")

    plots = ["metrics.png", "per_query_distribution.png"]
    if any(c.recall_curve for c in configs):
        plots.append("recall_curve.png")
    lines.append("## Plots")
    lines.append("")
    lines.extend(f"![{p}]({p})" for p in plots)
    lines.append("")
    return "\n".join(lines)


def write_report(result: RunResult, out: Path) -> list[Path]:
    """Write the whole run folder: data files, ``report.md`` and the PNG plots."""
    from eval.plots import write_plots  # matplotlib is heavy: import on use

    written = write_run(result, out)
    report = out / REPORT_FILE
    report.write_text(render_report(result), encoding="utf-8")
    written.append(report)
    written.extend(write_plots(result, out))
    return written


@dataclass(slots=True)
class PairedTest:
    """Per-query comparison of one metric between two configurations.

    Attributes:
        metric: The per-query metric compared.
        queries: Number of queries present in both.
        better: Queries where B beat A.
        worse: Queries where B lost to A.
        mean_delta: Mean of B - A over the shared queries.
        p_value: Two-sided paired randomization (sign-flip) test p-value.
    """

    metric: str
    queries: int
    better: int
    worse: int
    mean_delta: float
    p_value: float


def paired_test(
    a: ConfigResult, b: ConfigResult, metric: str, rounds: int = 10_000, seed: int = 0
) -> PairedTest | None:
    """Compare ``metric`` query by query; None when the runs share no such queries."""
    first = {str(r["qid"]): r.get(metric) for r in a.per_query if "qid" in r}
    second = {str(r["qid"]): r.get(metric) for r in b.per_query if "qid" in r}
    shared = sorted(
        q
        for q in first.keys() & second.keys()
        if isinstance(first[q], int | float) and isinstance(second[q], int | float)
    )
    if not shared:
        return None
    deltas = np.array([float(second[q]) - float(first[q]) for q in shared])  # type: ignore[arg-type]
    observed = abs(deltas.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(rounds, deltas.size))
    permuted = np.abs((signs * deltas).mean(axis=1))
    p_value = float((np.count_nonzero(permuted >= observed - 1e-12) + 1) / (rounds + 1))
    return PairedTest(
        metric=metric,
        queries=len(shared),
        better=int(np.count_nonzero(deltas > 0)),
        worse=int(np.count_nonzero(deltas < 0)),
        mean_delta=float(deltas.mean()),
        p_value=p_value,
    )


def pair_configs(a: RunResult, b: RunResult) -> list[tuple[ConfigResult, ConfigResult]]:
    """Configurations with the same name in both runs; the only two if each has one."""
    names_b = {c.name for c in b.configs}
    pairs = [(c, b.config(c.name)) for c in a.configs if c.name in names_b]
    if pairs:
        return pairs
    if len(a.configs) == 1 and len(b.configs) == 1:
        return [(a.configs[0], b.configs[0])]
    raise EvalError(
        "the runs share no configuration name: "
        f"A has {', '.join(c.name for c in a.configs)}; "
        f"B has {', '.join(c.name for c in b.configs)}"
    )


def render_comparison(a: RunResult, b: RunResult, label_a: str, label_b: str) -> str:
    """Markdown comparing run B against run A, configuration by configuration."""
    if a.kind != b.kind:
        raise EvalError(f"cannot compare a {a.kind} run with an {b.kind} run")
    pairs = pair_configs(a, b)
    lines = [f"# Comparison: B = {label_b} against A = {label_a}", ""]
    for first, second in pairs:
        title = first.name if first.name == second.name else f"{first.name} vs {second.name}"
        lines.append(f"## `{title}`")
        lines.append("")
        columns = [m for m in metric_columns([first, second]) if m in first.metrics]
        rows = []
        for column in columns:
            va, vb = first.metrics.get(column), second.metrics.get(column)
            delta = format_delta(column, vb - va) if va is not None and vb is not None else "–"
            rows.append([column, format_value(column, va), format_value(column, vb), delta])
        lines.extend(_table(["metric", "A", "B", "B - A"], rows))
        lines.append("")
        test = paired_test(first, second, a.distribution_metric)
        if test is not None:
            lines.append(
                f"Per query {test.metric}: B better on {test.better}, worse on {test.worse} "
                f"of {test.queries} queries; mean delta {test.mean_delta:+.4f}, "
                f"paired randomization p = {test.p_value:.4f}."
            )
            lines.append("")
    return "\n".join(lines)
