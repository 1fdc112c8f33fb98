"""Retrieval evaluation runs started from the API: one background thread, tenant-scoped.

A run names a BEIR dataset folder *inside* the configured datasets folder
(``settings.api.eval_datasets_dir``, default ``<data_dir>/eval-datasets``); a
client can never point the server at another path. Runs execute one at a time
on a worker thread with :class:`eval.RetrievalEvalRunner` (indexes cached in
``<data_dir>/eval-cache``); the run folder (metrics, ``report.md``, plots) lives
in ``<data_dir>/eval-runs/<run id>``, and the run's status and progress are rows
of the ``eval_runs`` table, so every read is scoped by tenant.

Example:
    >>> service = EvalRunService(settings, db, embedder)
    >>> run_id = service.submit("acme", "scifact", "test", {"bm25": "bm25"}, None)
    >>> service.run("acme", run_id).status
    'queued'
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, Database, new_id
from app.errors import ApiError, not_found
from app.settings import Settings
from eval import (
    BeirDataset,
    EvalError,
    RetrievalEvalRunner,
    RetrieverConfig,
    load_beir,
    parse_config,
    write_report,
)
from eval.configs import DEFAULT_RERANKER_MODEL
from eval.report import REPORT_FILE
from retrieval import Embedder

logger = logging.getLogger(__name__)

_DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_PLOT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CONFIGS = 8
_PROGRESS_EVERY_S = 0.5


class EvalRun(Base):
    """One evaluation run of a tenant: what was asked, where it is, what it found."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str] = mapped_column(String(128))
    split: Mapped[str] = mapped_column(String(64))
    configs: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    max_queries: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    plots: Mapped[list[str]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float, default=None)


def datasets_dir(settings: Settings) -> Path:
    """The folder whose sub-folders are the datasets runs may name."""
    return settings.api.eval_datasets_dir or settings.data_dir / "eval-datasets"


def check_dataset_name(name: str) -> str:
    """Return ``name`` if it is a plain folder name, else raise a 422.

    Raises:
        ApiError: 422 for separators, ``..``, NUL or other characters.
    """
    if not _DATASET_RE.match(name) or ".." in name:
        raise ApiError(
            422,
            f"invalid dataset name {name!r}: give the name of a folder in the server's "
            "eval datasets folder (1-100 characters from A-Z a-z 0-9 . _ -, no '/' or '..')",
            "invalid_dataset_name",
            param="dataset",
        )
    return name


def parse_configs(specs: dict[str, str], embedding_model: str) -> list[RetrieverConfig]:
    """Parse ``{name: "mode[,key=value...]"}`` with :func:`eval.parse_config`.

    Only the server's embedding model and the default reranker may be used: a
    client must not make the server load (or download) arbitrary models.

    Raises:
        ApiError: 422 naming the bad configuration.
    """
    if not specs:
        raise ApiError(422, "give at least one configuration", "invalid_config", param="configs")
    if len(specs) > MAX_CONFIGS:
        raise ApiError(
            422, f"at most {MAX_CONFIGS} configurations per run", "invalid_config", param="configs"
        )
    configs = []
    for name, spec in specs.items():
        try:
            config = parse_config(f"{name}={spec}", {"embedding_model": embedding_model})
        except EvalError as exc:
            raise ApiError(422, str(exc), "invalid_config", param="configs") from exc
        if config.embedding_model != embedding_model:
            raise ApiError(
                422,
                f"{name}: embedding_model must be the server's ({embedding_model!r})",
                "invalid_config",
                param="configs",
            )
        if config.reranker_model != DEFAULT_RERANKER_MODEL:
            raise ApiError(
                422,
                f"{name}: reranker_model cannot be changed through the API",
                "invalid_config",
                param="configs",
            )
        configs.append(config)
    return configs


class EvalRunService:
    """Starts, tracks and serves the tenants' retrieval evaluation runs.

    Args:
        settings: Data folder, datasets folder and the server's embedding model.
        db: Where runs are recorded (the ``eval_runs`` table is created if missing).
        embedder: The server's embedding model, shared with the runs.
    """

    def __init__(self, settings: Settings, db: Database, embedder: Embedder) -> None:
        self.settings = settings
        self.db = db
        self.embedder = embedder
        self.datasets_dir = datasets_dir(settings)
        self.runs_dir = settings.data_dir / "eval-runs"
        self.cache_dir = settings.data_dir / "eval-cache"
        EvalRun.__table__.create(db.engine, checkfirst=True)  # type: ignore[attr-defined]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragloom-eval")
        self._interrupt_stale_runs()

    def close(self) -> None:
        """Let the running evaluation finish; drop queued ones (marked failed on restart)."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _interrupt_stale_runs(self) -> None:
        with self.db.session() as s:
            for run in s.scalars(select(EvalRun).where(EvalRun.status.in_(("queued", "running")))):
                run.status, run.error = "failed", "interrupted: the server restarted"
                run.finished_at = time.time()

    # -- requests --------------------------------------------------------------------

    def load_dataset(self, name: str, split: str) -> BeirDataset:
        """Load a dataset of the datasets folder.

        Raises:
            ApiError: 422 for a bad name, split or dataset file; 404 for an unknown dataset.
        """
        check_dataset_name(name)
        if not _SPLIT_RE.match(split):
            raise ApiError(
                422,
                f"invalid split {split!r}: use 1-40 characters from A-Z a-z 0-9 _ -",
                "invalid_split",
                param="split",
            )
        folder = self.datasets_dir / name
        if not folder.is_dir():
            raise not_found("dataset", name)
        try:
            return load_beir(folder, split)
        except EvalError as exc:
            message = str(exc).replace(str(self.datasets_dir), "<datasets>")
            raise ApiError(422, f"dataset {name!r}: {message}", "invalid_dataset") from exc

    def submit(
        self,
        tenant: str,
        dataset_name: str,
        split: str,
        specs: dict[str, str],
        max_queries: int | None,
    ) -> str:
        """Validate the request, record a queued run and start it; returns the run id.

        Raises:
            ApiError: 422 for bad input, 404 for an unknown dataset.
        """
        configs = parse_configs(specs, self.settings.retrieval.embedding_model)
        dataset = self.load_dataset(dataset_name, split)
        run_id = new_id("eval")
        with self.db.session() as s:
            s.add(
                EvalRun(
                    id=run_id,
                    tenant=tenant,
                    dataset=dataset_name,
                    split=split,
                    configs=dict(specs),
                    max_queries=max_queries,
                    status="queued",
                    progress={},
                    plots=[],
                )
            )
        self._worker.submit(self._execute, run_id, dataset, configs, max_queries)
        logger.info("eval run %s queued for tenant %s on %s", run_id, tenant, dataset_name)
        return run_id

    def run(self, tenant: str, run_id: str) -> EvalRun:
        """A run of this tenant.

        Raises:
            ApiError: 404 for an unknown run or another tenant's.
        """
        with self.db.session() as s:
            run = s.get(EvalRun, run_id)
            if run is None or run.tenant != tenant:
                raise not_found("eval run", run_id)
            return run

    def runs(self, tenant: str) -> list[EvalRun]:
        """The tenant's runs, newest first."""
        with self.db.session() as s:
            query = (
                select(EvalRun).where(EvalRun.tenant == tenant).order_by(EvalRun.created_at.desc())
            )
            return list(s.scalars(query))

    def report(self, run: EvalRun) -> str | None:
        """The run's ``report.md``, once it has one."""
        path = self.runs_dir / run.id / REPORT_FILE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def plot_path(self, tenant: str, run_id: str, name: str) -> Path:
        """The file of one of the run's own plots.

        Raises:
            ApiError: 404 for another tenant's run or a plot the run did not write.
        """
        run = self.run(tenant, run_id)
        if not _PLOT_RE.match(name) or name not in run.plots:
            raise not_found("plot", name)
        path = self.runs_dir / run.id / f"{name}.png"
        if not path.is_file():
            raise not_found("plot", name)
        return path

    # -- the worker ------------------------------------------------------------------

    def _update(self, run_id: str, **fields: Any) -> None:
        with self.db.session() as s:
            run = s.get(EvalRun, run_id)
            if run is not None:
                for key, value in fields.items():
                    setattr(run, key, value)

    def _embedder_for(self, model: str) -> Embedder:
        # parse_configs only admits the server's model, so this is always the shared one
        if model != self.settings.retrieval.embedding_model:
            raise EvalError(f"embedding model {model!r} is not the server's")
        return self.embedder

    def _execute(
        self,
        run_id: str,
        dataset: BeirDataset,
        configs: list[RetrieverConfig],
        max_queries: int | None,
    ) -> None:
        self._update(run_id, status="running")
        last = 0.0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done == total or now - last >= _PROGRESS_EVERY_S:
                last = now
                self._update(run_id, progress={"stage": stage, "done": done, "total": total})

        try:
            runner = RetrievalEvalRunner(
                dataset,
                configs,
                cache_dir=self.cache_dir,
                max_queries=max_queries,
                embedder_factory=self._embedder_for,
            )
            result = runner.run(progress=progress)
            out = self.runs_dir / run_id
            written = write_report(result, out)
            plots = sorted(p.stem for p in written if p.suffix == ".png")
            fields: dict[str, Any] = {
                "status": "succeeded",
                "metrics": result.metrics,
                "plots": plots,
            }
        except EvalError as exc:
            logger.warning("eval run %s failed: %s", run_id, exc)
            fields = {"status": "failed", "error": str(exc)}
        except Exception as exc:  # a run must end with a status, whatever broke
            logger.exception("eval run %s crashed", run_id)
            fields = {"status": "failed", "error": f"internal error: {type(exc).__name__}"}
        self._update(run_id, finished_at=time.time(), **fields)
