"""What an evaluation run produces, and its folder on disk.

A run folder holds:

* ``metrics.json``: ``{configuration name: {metric name: value}}``;
* ``per_query.jsonl``: one line per (configuration, query) with its metrics;
* ``runs/<configuration>.trec``: a TREC run file per configuration (retrieval runs);
* ``run.json``: what was run (dataset, configurations, baseline, wall time, curves);
* ``report.md`` and ``*.png`` plots (written by :func:`eval.report.write_report`).

Both runners (retrieval and answers) return a :class:`RunResult`, and
:func:`load_run` reads a folder back, so ``ragloom eval compare`` works on either.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eval.errors import EvalError, RunFolderError
from eval.metrics import ranked

logger = logging.getLogger(__name__)

RunKind = Literal["retrieval", "answers"]

METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.jsonl"
RUN_INFO_FILE = "run.json"
RUNS_FOLDER = "runs"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def check_config_name(name: str) -> str:
    """Return ``name`` if it is usable as a file name and a TREC run tag, else raise."""
    if not _SAFE_NAME.match(name):
        raise EvalError(
            f"configuration name {name!r} must be 1-64 characters of letters, digits, "
            "'_', '.', '+' or '-', starting with a letter or digit"
        )
    return name


@dataclass(slots=True)
class ConfigResult:
    """The outcome of one configuration in a run.

    Attributes:
        name: The configuration's name (``bm25``, ``hyb``...).
        spec: Its parameters, as given (mode, weights, k...).
        metrics: ``metric name -> value`` (means over queries, latency percentiles).
        per_query: One dict per query: ``qid`` plus that query's metrics and extras.
        run: ``qid -> {doc_id: score}`` for retrieval runs (the TREC run), else None.
        recall_curve: ``k -> mean recall@k`` (retrieval runs), else empty.
    """

    name: str
    spec: dict[str, Any]
    metrics: dict[str, float]
    per_query: list[dict[str, Any]]
    run: dict[str, dict[str, float]] | None = None
    recall_curve: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class RunResult:
    """A whole evaluation run: several configurations over the same data.

    Attributes:
        kind: ``"retrieval"`` or ``"answers"``.
        configs: The configurations in run order.
        info: Free-form facts about the run (dataset, split, counts, index key...).
        wall_time_s: Wall-clock seconds of the whole run, index building included.
        baseline: Name of the configuration the report compares the others against.
        distribution_metric: The per-query metric the distribution plot shows.
    """

    kind: RunKind
    configs: list[ConfigResult]
    info: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    baseline: str | None = None
    distribution_metric: str = "ndcg@10"

    def __post_init__(self) -> None:
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise EvalError(f"configuration names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in names:
            raise EvalError(
                f"baseline {self.baseline!r} is not one of the configurations: {', '.join(names)}"
            )

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{configuration name: {metric: value}}``, as written to ``metrics.json``."""
        return {c.name: dict(c.metrics) for c in self.configs}

    def config(self, name: str) -> ConfigResult:
        """The configuration called ``name``."""
        for item in self.configs:
            if item.name == name:
                return item
        names = ", ".join(c.name for c in self.configs)
        raise EvalError(f"no configuration {name!r} in this run (have: {names})")


def write_trec_run(run: dict[str, dict[str, float]], path: Path, tag: str) -> None:
    """Write ``run`` as a TREC run file: ``qid Q0 docid rank score tag``, best first.

    Scores are written exactly (shortest round-trip form), so ties stay broken.
    """
    with path.open("w", encoding="utf-8") as handle:
        for qid in sorted(run):
            for rank, (doc_id, score) in enumerate(ranked(run[qid]), start=1):
                handle.write(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n")


def read_trec_run(path: Path) -> dict[str, dict[str, float]]:
    """Read a TREC run file written by :func:`write_trec_run` (or any 6-column run)."""
    run: dict[str, dict[str, float]] = {}
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise RunFolderError(f"{path}:{number}: expected 6 columns, got {len(parts)}")
            try:
                run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
            except ValueError as exc:
                raise RunFolderError(
                    f"{path}:{number}: score {parts[4]!r} is not a number"
                ) from exc
    return run


def write_run(result: RunResult, out: Path) -> list[Path]:
    """Write the data files of ``result`` into ``out`` (created if missing).

    Returns:
        The paths written. The report and plots come from :func:`eval.report.write_report`.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    written.append(metrics_path)

    per_query_path = out / PER_QUERY_FILE
    with per_query_path.open("w", encoding="utf-8") as handle:
        for config in result.configs:
            for row in config.per_query:
                handle.write(json.dumps({"config": config.name, **row}, ensure_ascii=False) + "\n")
    written.append(per_query_path)

    if any(c.run is not None for c in result.configs):
        runs = out / RUNS_FOLDER
        runs.mkdir(exist_ok=True)
        for config in result.configs:
            if config.run is not None:
                path = runs / f"{config.name}.trec"
                write_trec_run(config.run, path, config.name)
                written.append(path)

    info = {
        "kind": result.kind,
        "baseline": result.baseline,
        "wall_time_s": result.wall_time_s,
        "distribution_metric": result.distribution_metric,
        "info": result.info,
        "configs": [
            {
                "name": c.name,
                "spec": c.spec,
                "recall_curve": {str(k): v for k, v in c.recall_curve.items()},
            }
            for c in result.configs
        ],
    }
    info_path = out / RUN_INFO_FILE
    info_path.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    written.append(info_path)
    logger.info("wrote run data to %s", out)
    return written


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunFolderError(f"{path}: not found (is {path.parent} a ragloom eval run folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def load_run(folder: Path) -> RunResult:
    """Read a run folder written by :func:`write_run` back into a :class:`RunResult`.

    Raises:
        RunFolderError: the folder or one of its files is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: run folder not found")
    metrics = _read_json(folder / METRICS_FILE)
    info = _read_json(folder / RUN_INFO_FILE)
    if not isinstance(metrics, dict) or not isinstance(info, dict):
        raise RunFolderError(f"{folder}: metrics.json and run.json must hold JSON objects")

    per_query: dict[str, list[dict[str, Any]]] = {name: [] for name in metrics}
    pq_path = folder / PER_QUERY_FILE
    if pq_path.is_file():
        with pq_path.open("r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RunFolderError(f"{pq_path}:{number}: not valid JSON ({exc.msg})") from exc
                name = row.pop("config", None)
                if name in per_query:
                    per_query[name].append(row)

    specs = {c.get("name"): c for c in info.get("configs", []) if isinstance(c, dict)}
    configs: list[ConfigResult] = []
    for name, values in metrics.items():
        if not isinstance(values, dict):
            raise RunFolderError(f"{folder / METRICS_FILE}: metrics of {name!r} are not an object")
        meta = specs.get(name, {})
        trec = folder / RUNS_FOLDER / f"{name}.trec"
        configs.append(
            ConfigResult(
                name=name,
                spec=dict(meta.get("spec", {})),
                metrics={k: float(v) for k, v in values.items()},
                per_query=per_query.get(name, []),
                run=read_trec_run(trec) if trec.is_file() else None,
                recall_curve={int(k): float(v) for k, v in meta.get("recall_curve", {}).items()},
            )
        )
    kind = info.get("kind", "retrieval")
    if kind not in ("retrieval", "answers"):
        raise RunFolderError(f"{folder / RUN_INFO_FILE}: unknown run kind {kind!r}")
    baseline = info.get("baseline")
    return RunResult(
        kind=kind,
        configs=configs,
        info=dict(info.get("info", {})),
        wall_time_s=float(info.get("wall_time_s", 0.0)),
        baseline=baseline if baseline in metrics else None,
        distribution_metric=str(info.get("distribution_metric", "ndcg@10")),
    )
