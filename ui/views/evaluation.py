"""The Evaluation page: retrieval eval runs (``/api/eval/runs``): start, list, metrics, plots."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import streamlit as st

from ui.client import ApiClient, ApiError
from ui.render import fail_page, get_client
from ui.sanitize import sanitize_markdown

PLANNED = (
    "This page shows retrieval evaluation runs (`ragloom eval retrieval`): a table of "
    "runs with their dataset, configuration and metrics (nDCG@10, Recall@k, MRR), and plots "
    "comparing configurations."
)
DEFAULT_CONFIGS = "hybrid=hybrid\nbm25=bm25\ndense=dense"
_ERROR = "eval_error"
_FINAL = ("succeeded", "failed")


def parse_configs(text: str) -> dict[str, str]:
    """Configurations typed one a line as ``name=mode[,key=value...]``.

    Raises:
        ValueError: a line without a name or a mode, or a name used twice.
    """
    configs: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, spec = line.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ValueError(f"write each configuration as name=mode[,key=value], got {line!r}")
        if name in configs:
            raise ValueError(f"configuration name {name!r} is used twice")
        configs[name] = spec
    if not configs:
        raise ValueError("give at least one configuration, e.g. hybrid=hybrid")
    return configs


def flatten_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """One table row of a run: scalar fields, nested dicts spread out, times readable."""
    row: dict[str, Any] = {}
    for key, value in run.items():
        if key in ("created_at", "finished_at") and isinstance(value, int | float):
            row[key] = dt.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
        elif key == "configs" and isinstance(value, Mapping):
            row[key] = "; ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, Mapping):
            for sub, inner in value.items():
                if isinstance(inner, str | int | float | bool) or inner is None:
                    row[f"{key}.{sub}"] = inner
        elif isinstance(value, str | int | float | bool) or value is None:
            row[str(key)] = value
    return row


def metrics_rows(metrics: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """``{config: {metric: value}}`` as table rows, one per configuration."""
    return [{"config": name, **dict(values)} for name, values in metrics.items()]


def _start_run(client: ApiClient) -> None:
    state = st.session_state
    try:
        configs = parse_configs(str(state.get("eval_configs") or ""))
    except ValueError as exc:
        state[_ERROR] = str(exc)
        return
    dataset = str(state.get("eval_dataset") or "").strip()
    if not dataset:
        state[_ERROR] = "Type the name of a dataset folder of the server."
        return
    split = str(state.get("eval_split") or "test").strip()
    max_queries = int(state.get("eval_max_queries") or 0) or None
    try:
        run = client.start_eval_run(dataset, split, configs, max_queries)
    except ApiError as exc:
        state[_ERROR] = exc.message
        return
    state["eval_run"] = run["id"]


def _start_form(client: ApiClient, expanded: bool) -> None:
    with (
        st.expander("Start a run", expanded=expanded, icon=":material/play_arrow:"),
        st.form("eval_new", border=False),
    ):
        st.text_input("Dataset (a BEIR folder of the server)", key="eval_dataset")
        st.text_input("Split", value="test", key="eval_split")
        st.text_area(
            "Configurations (name=mode[,key=value], one a line)",
            DEFAULT_CONFIGS,
            key="eval_configs",
        )
        st.number_input("Max queries (0 = all)", min_value=0, value=0, key="eval_max_queries")
        st.form_submit_button("Start", on_click=_start_run, args=(client,))


def _run_detail(client: ApiClient, run_id: str) -> None:
    try:
        run = client.eval_run(run_id)
    except ApiError as exc:
        st.error(exc.message, icon=":material/error:")
        return
    status = str(run.get("status"))
    if status not in _FINAL:
        progress = run.get("progress") or {}
        total, done = int(progress.get("total") or 0), int(progress.get("done") or 0)
        stage = progress.get("stage") or status
        st.progress(min(done / total, 1.0) if total else 0.0, text=f"{stage}: {done} of {total}")
        st.button("Refresh", key="eval_refresh", icon=":material/refresh:")
        return
    if status == "failed":
        st.warning(f"The run failed: {sanitize_markdown(str(run.get('error') or '?'))}")
        return
    metrics = run.get("metrics") or {}
    if metrics:
        rows = metrics_rows(metrics)
        st.subheader("Metrics")
        st.dataframe(rows, hide_index=True)
        names = sorted({k for row in rows for k in row if k != "config"})
        preferred = next((n for n in ("ndcg@10", "recall@10", "mrr@10") if n in names), None)
        index = names.index(preferred) if preferred else 0
        metric = st.selectbox("Metric", names, index=index, key="eval_metric")
        st.bar_chart(
            {str(r["config"]): r.get(metric) for r in rows}, x_label="config", y_label=metric
        )
    for name, path in (run.get("plots") or {}).items():
        try:
            st.image(client.plot(str(path)), caption=str(name))
        except ApiError as exc:
            st.caption(f"plot {name}: {exc.message}")
    if run.get("report"):
        with st.expander("Report", icon=":material/article:"):
            st.markdown(sanitize_markdown(str(run["report"])))


def render() -> None:
    """Draw the Evaluation page."""
    client = get_client()
    st.title("Evaluation")
    try:
        runs = client.eval_runs()
    except ApiError as exc:
        fail_page(exc)
    if runs is None:
        st.info(PLANNED, icon=":material/analytics:")
        st.caption("The API has no evaluation routes yet (GET /api/eval/runs answered 404).")
        return
    error = st.session_state.pop(_ERROR, None)
    if error:
        st.error(error, icon=":material/error:")
    _start_form(client, expanded=not runs)
    if not runs:
        st.info("No evaluation runs yet: start one above or run `ragloom eval retrieval`.")
        return
    st.subheader(f"Runs ({len(runs)})")
    st.dataframe([flatten_run(r) for r in runs], hide_index=True)
    ids = [str(r["id"]) for r in runs]
    labels = {str(r["id"]): f"{r['id']} · {r.get('dataset')}" for r in runs}
    if st.session_state.get("eval_run") not in ids:
        st.session_state.pop("eval_run", None)
    run_id = st.selectbox("Run", ids, format_func=labels.__getitem__, key="eval_run")
    if run_id:
        _run_detail(client, run_id)
