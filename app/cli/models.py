"""CLI commands: ``ragloom models pull NAME`` and ``ragloom models list``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail, load_settings

models_app = typer.Typer(help="Local model files (offline registry).", no_args_is_help=True)

ModelsDirOption = Annotated[
    Path | None, typer.Option("--models-dir", help="Where model files live (default: settings).")
]


def _models_dir(override: Path | None) -> Path:
    if override is not None:
        return override

    return load_settings(fresh=False).models_dir


@models_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="Registry name, e.g. smollm2-135m.")],
    models_dir: ModelsDirOption = None,
) -> None:
    """Fetch a model into the models dir and print its path."""
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.registry import pull_model

    try:
        path = pull_model(name, _models_dir(models_dir))
    except EngineError as exc:
        fail(str(exc))
    typer.echo(str(path))


@models_app.command("list")
def list_(models_dir: ModelsDirOption = None) -> None:
    """List registry models and local GGUF files."""
    from llm_backend.engine.registry import list_models

    for info in list_models(_models_dir(models_dir)):
        state = "present" if info.present else "not pulled"
        size_mib = info.size_bytes / 2**20
        typer.echo(f"{info.name}\t{state}\t{size_mib:.1f} MiB\t{info.path}\t{info.description}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(models_app, name="models")
