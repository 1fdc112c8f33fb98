"""Retrieval evaluation runs: ``/api/eval/runs`` (start, list, read) and their plots.

A run evaluates retriever configurations on a BEIR dataset that the operator
placed in the server's eval datasets folder; it runs in the background (202 +
run id) and is visible only to the tenant that started it.

Example::

    POST /api/eval/runs {"dataset": "scifact", "split": "test",
                         "configs": {"bm25": "bm25", "hyb": "hybrid,bm25_weight=0.6"}}
    -> 202 {"id": "eval_...", "status": "queued", ...}
    GET  /api/eval/runs/eval_...              -> status, progress, metrics, report, plots
    GET  /api/eval/runs/eval_.../plots/metrics.png
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.deps import PrincipalDep
from app.services.eval_runs import EvalRun, EvalRunService

router = APIRouter(prefix="/api/eval", tags=["eval"])


def get_eval_runs(request: Request) -> EvalRunService:
    """The app's evaluation run service."""
    service: EvalRunService = request.app.state.eval_runs
    return service


EvalRunsDep = Annotated[EvalRunService, Depends(get_eval_runs)]


class EvalRunCreate(BaseModel):
    """Body of ``POST /api/eval/runs``."""

    dataset: str = Field(
        min_length=1,
        max_length=100,
        description="Name of a BEIR folder in the server's eval datasets folder (not a path).",
    )
    split: str = Field(default="test", min_length=1, max_length=40)
    configs: dict[str, str] = Field(
        min_length=1,
        description='Retriever configurations {name: "mode[,key=value...]"}, '
        'e.g. {"hyb": "hybrid,bm25_weight=0.6"}.',
    )
    max_queries: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N judged queries."
    )


class EvalProgress(BaseModel):
    """Where a run is: ``index:<n>`` (building an index) or ``config:<name>`` (querying)."""

    stage: str | None = None
    done: int = 0
    total: int = 0


class EvalRunSummary(BaseModel):
    """A run in the list."""

    id: str
    status: str
    created_at: float
    finished_at: float | None
    dataset: str
    split: str
    configs: dict[str, str]


class EvalRunsPublic(BaseModel):
    """The tenant's runs, newest first."""

    data: list[EvalRunSummary]


class EvalRunPublic(EvalRunSummary):
    """One run with its progress and, once done, metrics, report and plot URLs."""

    max_queries: int | None
    progress: EvalProgress
    metrics: dict[str, dict[str, float]] | None
    report: str | None
    plots: dict[str, str]
    error: str | None


def _summary(run: EvalRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "status": run.status,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "dataset": run.dataset,
        "split": run.split,
        "configs": run.configs,
    }


def _public(run: EvalRun, service: EvalRunService) -> EvalRunPublic:
    return EvalRunPublic(
        **_summary(run),
        max_queries=run.max_queries,
        progress=EvalProgress.model_validate(run.progress or {}),
        metrics=run.metrics,
        report=service.report(run) if run.status == "succeeded" else None,
        plots={name: f"/api/eval/runs/{run.id}/plots/{name}.png" for name in run.plots or []},
        error=run.error,
    )


@router.post("/runs", status_code=202)
async def start_run(body: EvalRunCreate, who: PrincipalDep, service: EvalRunsDep) -> EvalRunPublic:
    """Start a retrieval evaluation in the background (422 bad input, 404 unknown dataset)."""
    run_id = await run_in_threadpool(
        service.submit, who.tenant, body.dataset, body.split, body.configs, body.max_queries
    )
    return await get_run(run_id, who, service)


@router.get("/runs")
async def list_runs(who: PrincipalDep, service: EvalRunsDep) -> EvalRunsPublic:
    """The caller's runs, newest first."""
    runs = await run_in_threadpool(service.runs, who.tenant)
    return EvalRunsPublic(data=[EvalRunSummary(**_summary(r)) for r in runs])


@router.get("/runs/{run_id}")
async def get_run(run_id: str, who: PrincipalDep, service: EvalRunsDep) -> EvalRunPublic:
    """A run's status, progress, metrics, report markdown and plot URLs."""

    def read() -> EvalRunPublic:
        return _public(service.run(who.tenant, run_id), service)

    return await run_in_threadpool(read)


@router.get("/runs/{run_id}/plots/{name}.png", response_class=FileResponse)
async def get_plot(run_id: str, name: str, who: PrincipalDep, service: EvalRunsDep) -> FileResponse:
    """One of the run's own PNG plots."""
    path = await run_in_threadpool(service.plot_path, who.tenant, run_id, name)
    return FileResponse(path, media_type="image/png")
