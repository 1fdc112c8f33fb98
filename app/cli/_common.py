"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from app.settings import Settings


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit non-zero (never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_settings(*, fresh: bool = True) -> Settings:
    """The settings (read anew, or the process-wide cached copy), or a one-line error
    naming each bad ``RAGLOOM_*`` variable."""
    from pydantic import ValidationError

    from app.settings import Settings, get_settings

    try:
        return Settings() if fresh else get_settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "RAGLOOM_" + "__".join(str(part) for part in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}")
        fail("bad setting " + "; ".join(problems))
