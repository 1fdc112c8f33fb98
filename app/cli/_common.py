"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit non-zero (never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)
