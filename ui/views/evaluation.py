"""The Evaluation page: retrieval eval runs from ``GET /api/eval/runs`` once the API has them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import streamlit as st

from ui.client import ApiError
from ui.render import fail_page, get_client

PLANNED = (
    "This page will show retrieval evaluation runs (`ragloom eval retrieval`): a table of "
    "runs with their dataset, configuration and metrics (nDCG@10, Recall@k, MRR), and plots "
    "comparing configurations."
)


def flatten_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """One table row of a run: scalar fields, with a nested ``metrics`` dict spread out."""
    row: dict[str, Any] = {}
    for key, value in run.items():
        if isinstance(value, Mapping):
            for sub, inner in value.items():
                if isinstance(inner, str | int | float | bool) or inner is None:
                    row[f"{key}.{sub}" if key != "metrics" else str(sub)] = inner
        elif isinstance(value, str | int | float | bool) or value is None:
            row[str(key)] = value
    return row


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
    if not runs:
        st.info("No evaluation runs yet: run `ragloom eval retrieval ...` to make one.")
        return
    rows = [flatten_run(r) for r in runs]
    st.subheader(f"Runs ({len(rows)})")
    st.dataframe(rows, use_container_width=True, hide_index=True)
    numeric = sorted(
        {
            k
            for row in rows
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    label = next((k for k in ("name", "id", "config") if k in rows[0]), None)
    if numeric and label:
        metric = st.selectbox("Metric", numeric, key="eval_metric")
        chart = {
            str(row.get(label)): row.get(metric) for row in rows if row.get(metric) is not None
        }
        st.bar_chart(chart, x_label=label, y_label=metric)
