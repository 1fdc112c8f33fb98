"""Rerankers: the ``Reranker`` seam and a sentence-transformers cross-encoder."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from llm_backend.threads import run_on_fresh_thread
from retrieval.models import ModelNotAvailable

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)


@runtime_checkable
class Reranker(Protocol):
    """Scores (query, passage) pairs; higher means more relevant."""

    def warm_up(self) -> None:
        """Load heavy resources; safe to call more than once."""
        ...

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One relevance score per passage, in the order given."""
        ...


class CrossEncoderReranker:
    """Reranks with a sentence-transformers ``CrossEncoder`` loaded from a local folder.

    Example:
        >>> reranker = CrossEncoderReranker("/models/ms-marco-MiniLM-L-6-v2")
        >>> reranker.score("what is bm25?", ["BM25 is a ranking function.", "Cats purr."])
        [7.1, -11.2]

    Args:
        model_path: Folder of a cross-encoder (config, weights, tokenizer).
        device: Torch device; default cuda when available, else cpu.
        batch_size: Pairs per forward pass.
        max_length: Longest (query + passage) input in tokens.
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length}")
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: CrossEncoder | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the model once. Raises ModelNotAvailable when it is not a loadable folder."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:
                self._model = run_on_fresh_thread(self._load, name="ragloom-rerank")

    def _load(self) -> CrossEncoder:
        from sentence_transformers import CrossEncoder

        if not os.path.isdir(self.model_path):
            raise ModelNotAvailable(
                f"cross-encoder {self.model_path!r} is not a local folder; no cross-encoder "
                "can be downloaded offline: give the path of a local cross-encoder folder"
            )
        if self.device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = self.device
        try:
            model = CrossEncoder(
                self.model_path, device=device, max_length=self.max_length, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotAvailable(
                f"cannot load cross-encoder from {self.model_path!r}: {exc}"
            ) from exc
        logger.info("loaded cross-encoder %s on %s", self.model_path, device)
        return model

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """Relevance logits for each passage (higher is better)."""
        if not passages:
            return []
        self.warm_up()
        model = self._model
        assert model is not None
        scores = run_on_fresh_thread(
            lambda: model.predict(
                [(query, p) for p in passages],
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
            ),
            name="ragloom-rerank",
        )
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim == 2:  # (N, labels): take the last label as "relevant"
            scores = scores[:, -1]
        return [float(s) for s in scores]
