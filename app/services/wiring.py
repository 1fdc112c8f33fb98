"""Build the LLM backend and retrievers from the settings (used by the API and the CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings
    from llm_backend import ChatBackend
    from retrieval import HybridRetriever


def build_backend(
    settings: Settings, kind: str, base_url: str | None, model: str | None
) -> ChatBackend:
    """The LLM backend the settings (or the overrides) name.

    Args:
        settings: The settings.
        kind: ``engine`` (ours, in-process) or ``openai`` (any compatible server).
        base_url: Overrides ``settings.agent.base_url``.
        model: Overrides the served model name (openai) or the registry name/GGUF path.

    Raises:
        llm_backend.errors.BackendError, llm_backend.engine.errors.EngineError:
            the backend cannot be built (bad URL, model file missing, ...).
    """
    if kind == "openai":
        from llm_backend import OpenAICompatBackend

        return OpenAICompatBackend(
            base_url or settings.agent.base_url,
            model or settings.agent.model or settings.engine.model,
            api_key=settings.llm.api_key,
            connect_timeout=settings.llm.connect_timeout_s,
            read_timeout=settings.llm.request_timeout_s,
            context_window=settings.engine.max_seq_len,
        )
    from llm_backend import LocalEngineBackend
    from llm_backend.engine.registry import resolve_model

    name = model or settings.engine.model
    path = resolve_model(name, settings.models_dir)
    return LocalEngineBackend.from_model_path(
        path,
        model_name=name,
        quant=settings.engine.quant,
        max_batch=settings.engine.max_batch,
        max_seq_len=settings.engine.max_seq_len,
        max_waiting=settings.engine.max_queue,
        compile_decode=settings.engine.compile_decode,
    )


def open_retriever(settings: Settings, collection: str, k: int, mode: str) -> HybridRetriever:
    """The hybrid retriever over ``collection`` in the data folder.

    Raises:
        retrieval.RetrievalError: the collection does not exist or is invalid.
    """
    from retrieval import CollectionNotFound, HybridRetriever

    r = settings.retrieval
    if r.chroma_url is None and not (settings.data_dir / "manifest.sqlite").exists():
        raise CollectionNotFound(
            f"collection {collection!r} does not exist (no data in {settings.data_dir})"
        )
    return HybridRetriever.from_data_dir(
        settings.data_dir,
        collection,
        chroma_url=r.chroma_url,
        k=k,
        mode=mode,
        fetch_k=r.fetch_k,
        rrf_k=r.rrf_k,
        dense_weight=r.dense_weight,
        bm25_weight=r.bm25_weight,
    )
