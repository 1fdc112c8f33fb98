"""The engine's exception family.

- ``EngineError``: the base class of everything the engine raises on purpose.
- ``ModelFileError``: a model file is missing, truncated, not GGUF, or uses an
  architecture / tensor type the engine does not support. The message names the
  file and the problem in one line.
"""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class of every error raised by ``llm_backend.engine``."""


class ModelFileError(EngineError):
    """A model file cannot be used.

    Args:
        path: The file (or registry name) that was asked for.
        problem: What is wrong with it, e.g. ``"not a GGUF file (bad magic)"``.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"model file {self.path}: {problem}")
