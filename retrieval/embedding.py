"""Text embedders: the ``Embedder`` seam and its sentence-transformers implementation."""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from llm_backend.threads import run_on_fresh_thread
from retrieval.models import ModelNotAvailable, offline_hint, resolve_model_path
from retrieval.types import RetrievalError

# the short-lived thread embeddings run on (llm_backend.threads: one OpenMP pool per process)
_THREAD = "ragloom-embedding"

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from retrieval.query_encoder import QueryEncoder

logger = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors (cosine = dot product)."""

    model_name: str

    @property
    def dimension(self) -> int:
        """Length of each vector (loads the model if needed)."""
        ...

    def warm_up(self) -> None:
        """Load heavy resources; safe to call more than once."""
        ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many texts: returns an array of shape (N, dimension)."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query: returns an array of shape (dimension,)."""
        ...


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX via oneDNN)."""
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class SentenceTransformerEmbedder:
    """Embeds with a sentence-transformers model, batched and normalised.

    The model loads lazily on the first call (or an explicit ``warm_up()``).
    Names go through ``resolve_model_path``, so ``"all-MiniLM-L6-v2"`` loads
    from the offline package; a hub id that is not cached fails at once with
    ``ModelNotAvailable`` when ``HF_HUB_OFFLINE=1``.

    Example:
        >>> embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
        >>> vectors = embedder.embed_documents(["first text", "second text"])
        >>> vectors.shape
        (2, 384)

    Args:
        model_name: Model name, local folder or hub id.
        device: ``"cpu"``, ``"cuda"``...; default cuda when available, else cpu.
        batch_size: Texts per forward pass.
        progress_threshold: Show a progress bar when embedding more texts than this.
        query_dtype: Precision of ``embed_query``: ``"float32"``, ``"bfloat16"`` or
            ``"auto"`` (bfloat16 on a CPU with native bf16 matmuls, else float32). A
            query is one short text, so its forward pass is bound by reading the
            weights; a bf16 copy halves that (MiniLM: cosine to the fp32 vector
            > 0.9999). Documents are always embedded in float32.
        query_backend: What runs ``embed_query`` for a BERT model with mean pooling:
            ``"torch"`` (``BertQueryEncoder``, plain functions), ``"onnx"``
            (``OnnxQueryEncoder``: ONNX Runtime, exported in memory at load, ~2 s) or
            ``"auto"`` (onnx for float32 queries on a CPU without native bf16, where
            torch's small matmuls are slow: MiniLM 6.6 vs 14 ms here; else torch).
            Other models, or a failed export, use the generic sentence-transformers path.
    """

    def __init__(
        self,
        model_name: str = "all-MiniLM-L6-v2",
        *,
        device: str | None = None,
        batch_size: int = 64,
        progress_threshold: int = 1000,
        query_dtype: str = "auto",
        query_backend: str = "auto",
    ) -> None:
        if not model_name or not model_name.strip():
            raise ValueError("model_name must be a non-empty string")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if progress_threshold < 0:
            raise ValueError(f"progress_threshold must be >= 0, got {progress_threshold}")
        self.model_name = model_name
        self.device = device
        self.batch_size = batch_size
        if query_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"query_dtype must be auto, float32 or bfloat16, got {query_dtype!r}")
        if query_backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"query_backend must be auto, torch or onnx, got {query_backend!r}")
        self.progress_threshold = progress_threshold
        self.query_dtype = query_dtype
        self.query_backend = query_backend
        self._model: SentenceTransformer | None = None
        self._query_model: SentenceTransformer | None = None
        self._query_encoder: QueryEncoder | None = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the model (once). Raises ModelNotAvailable when it cannot be loaded offline."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            self._model = run_on_fresh_thread(self._load_with_query_model, _THREAD)

    def _load_with_query_model(self) -> SentenceTransformer:
        model = self._load()
        self._make_query_model(model)
        return model

    def _make_query_model(self, model: SentenceTransformer) -> None:
        """Set what ``embed_query`` runs: a lean encoder for a BERT model with mean
        pooling (``retrieval.query_encoder``: ONNX Runtime or torch), else ``model``
        itself or a bfloat16 copy."""
        import torch

        from retrieval.query_encoder import BertQueryEncoder, OnnxQueryEncoder

        on_cpu = str(model.device).startswith("cpu")
        native_bf16 = on_cpu and _cpu_has_native_bf16()
        wanted = self.query_dtype
        if wanted == "auto":
            wanted = "bfloat16" if native_bf16 else "float32"
        dtype = torch.bfloat16 if wanted == "bfloat16" else torch.float32
        backend = self.query_backend
        if backend == "auto":  # onnx where torch's float32 small matmuls are the slow path
            slow_matmuls = on_cpu and dtype == torch.float32 and not native_bf16
            backend = "onnx" if slow_matmuls else "torch"
        encoder: QueryEncoder | None = None
        if backend == "onnx" and on_cpu:
            encoder = OnnxQueryEncoder.from_sentence_transformer(model)
        if encoder is None:
            encoder = BertQueryEncoder.from_sentence_transformer(model, dtype)
        self._query_encoder = encoder
        if encoder is not None or dtype == torch.float32:
            self._query_model = model
        else:
            self._query_model = copy.deepcopy(model).to(torch.bfloat16).eval()
        logger.info("query embeddings: %s", type(encoder).__name__ if encoder else "generic")

    def _load(self) -> SentenceTransformer:
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(self.model_name)
        device = self.device or _default_device()
        is_local = os.path.isdir(path)
        kwargs: dict[str, Any] = {"device": device}
        if not is_local and _hub_offline():
            kwargs["local_files_only"] = True
        try:
            model = SentenceTransformer(path, **kwargs)
        except Exception as exc:  # the hub client raises many types; all mean "not loadable"
            where = "local folder" if is_local else "hub id (offline: HF_HUB_OFFLINE=1)"
            raise ModelNotAvailable(
                f"cannot load embedding model {self.model_name!r} as a {where}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                f"{offline_hint()}"
            ) from exc
        model.eval()
        logger.info("loaded embedding model %s on %s", self.model_name, device)
        return model

    @property
    def model(self) -> SentenceTransformer:
        """The loaded sentence-transformers model."""
        self.warm_up()
        assert self._model is not None
        return self._model

    @property
    def dimension(self) -> int:
        """Length of each embedding vector."""
        model = self.model
        getter = getattr(model, "get_embedding_dimension", None)
        dim = getter() if getter is not None else model.get_sentence_embedding_dimension()
        if dim is None:
            raise RetrievalError(f"model {self.model_name!r} does not report its dimension")
        return int(dim)

    @property
    def max_seq_length(self) -> int:
        """Longest input (in model tokens) the model reads; longer text is truncated."""
        return int(self.model.max_seq_length or 0)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in batches (sorted by length inside sentence-transformers).

        Returns:
            float32 array of shape (N, dimension), each row of unit length.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        model = self.model
        vectors = run_on_fresh_thread(
            lambda: model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=len(texts) > self.progress_threshold,
            ),
            _THREAD,
        )
        return np.asarray(vectors, dtype=np.float32)  # (N, D)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query text: float32 array of shape (dimension,)."""
        self.warm_up()
        return run_on_fresh_thread(lambda: self._embed_query(text), _THREAD)

    def _embed_query(self, text: str) -> np.ndarray:
        import torch

        if self._query_encoder is not None:
            return self._query_encoder.encode(text)
        model = self._query_model
        assert model is not None
        # A lean path for one short text: tokenize + forward without encode()'s
        # batching and sorting machinery (about 1 ms less per query on CPU).
        with torch.inference_mode():
            prepare = getattr(model, "preprocess", None) or model.tokenize
            features = {
                key: value.to(model.device) if isinstance(value, torch.Tensor) else value
                for key, value in prepare([text]).items()
            }
            out = model(features)["sentence_embedding"].float()  # (1, D)
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out[0].float().cpu().numpy()
