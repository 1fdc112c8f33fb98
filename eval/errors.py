"""The eval package's exceptions: one small family, each message naming the culprit."""

from __future__ import annotations

from pathlib import Path


class EvalError(Exception):
    """Base class of every error raised by the eval package."""


class DatasetError(EvalError):
    """A dataset file is missing or malformed; the message names the file and line.

    Attributes:
        path: The offending file (or folder).
        line: 1-based line number, or None when the problem is the whole file.
    """

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


class ConfigError(EvalError):
    """A retriever/answer configuration string or a gate could not be parsed."""


class RunFolderError(EvalError):
    """A run output folder is missing or does not hold a readable run."""
