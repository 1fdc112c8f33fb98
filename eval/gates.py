"""Quality gates for CI: ``ndcg@10=0.65`` fails the run when a configuration is below.

A gate is ``[CONFIG:]METRIC=THRESHOLD``. Without ``CONFIG:`` every configuration
must pass it. For lower-is-better metrics (latencies, refusal rate) the value
must be at most the threshold; for the others, at least.

Example:
    >>> gates = [parse_gate("ndcg@10=0.65"), parse_gate("bm25:recall@100=0.9")]
    >>> failures = check_gates(result, gates)   # [] when all pass
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from eval.errors import ConfigError
from eval.metrics import LOWER_IS_BETTER
from eval.results import RunResult


@dataclass(frozen=True, slots=True)
class Gate:
    """A threshold on one metric.

    Attributes:
        metric: Metric name as in ``metrics.json`` (``ndcg@10``...).
        threshold: The bound.
        config: Configuration it applies to; None means all of them.
    """

    metric: str
    threshold: float

    config: str | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def __str__(self) -> str:
        scope = f"{self.config}:" if self.config else ""
        op = "<=" if self.lower_is_better else ">="
        return f"{scope}{self.metric} {op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class GateFailure:
    """A gate a configuration did not pass."""

    gate: Gate
    config: str
    value: float

    def __str__(self) -> str:
        return f"{self.config}: {self.gate.metric} = {self.value:.4f}, needs {self.gate}"


def parse_gate(text: str) -> Gate:
    """Parse ``[CONFIG:]METRIC=THRESHOLD``.

    Raises:
        ConfigError: the text is not of that form or the threshold is not a number.
    """
    scope, sep, rest = text.partition(":")
    if not sep or "=" in scope:
        scope, rest = "", text
    metric, eq, raw = rest.partition("=")
    metric = metric.strip().lower()
    if not eq or not metric or not raw.strip():
        raise ConfigError(f"gate {text!r} must look like METRIC=THRESHOLD, e.g. ndcg@10=0.65")
    try:
        threshold = float(raw)
    except ValueError as exc:
        raise ConfigError(f"gate {text!r}: threshold {raw.strip()!r} is not a number") from exc
    if math.isnan(threshold):
        raise ConfigError(f"gate {text!r}: threshold is NaN")
    return Gate(metric=metric, threshold=threshold, config=scope.strip() or None)


def check_gates(result: RunResult, gates: Sequence[Gate]) -> list[GateFailure]:
    """Every (gate, configuration) pair that fails; empty when all pass.

    Raises:
        ConfigError: a gate names a metric or configuration the run does not have.
    """
    failures: list[GateFailure] = []
    names = [c.name for c in result.configs]
    for gate in gates:
        if gate.config is not None and gate.config not in names:
            raise ConfigError(
                f"gate {gate} names configuration {gate.config!r}; the run has {', '.join(names)}"
            )
        targets = [c for c in result.configs if gate.config in (None, c.name)]
        for config in targets:
            if gate.metric not in config.metrics:
                known = ", ".join(config.metrics)
                raise ConfigError(f"gate {gate}: no metric {gate.metric!r} (known: {known})")
            value = config.metrics[gate.metric]
            ok = value <= gate.threshold if gate.lower_is_better else value >= gate.threshold
            if not ok or math.isnan(value):
                failures.append(GateFailure(gate=gate, config=config.name, value=value))
    return failures
