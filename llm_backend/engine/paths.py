"""Where the engine caches what it builds (compiled decode steps, C++ kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def engine_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/ragloom/<name>`` (``~/.cache/ragloom/<name>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "ragloom" / name
