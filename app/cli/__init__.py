"""The ``ragloom`` command line.

Each command group lives in its own module with a ``register(app)`` function,
so the groups stay independent of each other.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from app.cli import ask, engine, evaluation, keys, models, retrieval, serve, ui, vllm

app = typer.Typer(
    name="ragloom",
    help="RAG and agent framework: ingest, retrieve, answer, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print ragloom's version."""
    from importlib.metadata import version as _version

    typer.echo(_version("ragloom"))


for _module in (retrieval, models, engine, ask, serve, ui, keys, evaluation, vllm):
    _module.register(app)


def main() -> None:
    """Entry point of the ``ragloom`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    logging.basicConfig(
        level=os.environ.get("RAGLOOM_LOG_LEVEL", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    app()
