"""PNG plots of a run (matplotlib, Agg backend: no display needed).

* ``metrics.png``: grouped bars, one group per metric, one bar per configuration;
* ``per_query_distribution.png``: the per-query distribution of the run's
  distribution metric (nDCG@10 for retrieval, token F1 for answers), one box per
  configuration with the points over it;
* ``recall_curve.png``: mean recall@k against k (retrieval runs only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from eval.metrics import LOWER_IS_BETTER
from eval.report import metric_columns
from eval.results import RunResult

logger = logging.getLogger(__name__)


def _bar_columns(result: RunResult) -> list[str]:
    """Metrics on a 0..1 scale (latencies and counts would squash the bars)."""
    columns = metric_columns(result.configs)
    keep = []
    for column in columns:
        if column in LOWER_IS_BETTER and not column.endswith("_rate"):
            continue
        if column.startswith("num_") or column.startswith("judge_"):
            continue
        values = [c.metrics.get(column) for c in result.configs]
        if all(v is not None and 0.0 <= v <= 1.0 for v in values):
            keep.append(column)
    return keep


def plot_metric_bars(result: RunResult, path: Path) -> Path:
    """Grouped bar chart of every 0..1 metric, one bar per configuration."""
    columns = _bar_columns(result)
    names = [c.name for c in result.configs]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(columns) * max(1, len(names)) / 2), 4.5))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(columns))
    for i, config in enumerate(result.configs):
        values = [config.metrics.get(c, 0.0) for c in columns]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=config.name)
    ax.set_xticks(x)
    ax.set_xticklabels(columns, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"{result.kind} metrics per configuration")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_distribution(result: RunResult, path: Path) -> Path:
    """Box plot (with jittered points) of the per-query distribution metric."""
    metric = result.distribution_metric
    data = []
    for config in result.configs:
        values = [r[metric] for r in config.per_query if isinstance(r.get(metric), int | float)]
        data.append(values or [0.0])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(data)), 4.5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels([c.name for c in result.configs])
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        jitter = rng.uniform(-0.15, 0.15, size=len(values))
        ax.scatter(np.full(len(values), i) + jitter, values, s=6, alpha=0.35)
    ax.set_ylabel(f"per-query {metric}")
    ax.set_title(f"per-query {metric} distribution")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recall_curve(result: RunResult, path: Path) -> Path:
    """Mean recall@k against k (log x axis), one line per configuration."""
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    for config in result.configs:
        if not config.recall_curve:
            continue
        ks = sorted(config.recall_curve)
        ax.plot(ks, [config.recall_curve[k] for k in ks], marker="o", label=config.name)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_title("recall@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(result: RunResult, out: Path) -> list[Path]:
    """Write the run's PNG plots into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_metric_bars(result, out / "metrics.png"),
        plot_distribution(result, out / "per_query_distribution.png"),
    ]
    if any(c.recall_curve for c in result.configs):
        paths.append(plot_recall_curve(result, out / "recall_curve.png"))
    logger.info("wrote %d plots to %s", len(paths), out)
    return paths
