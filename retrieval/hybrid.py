"""Hybrid retrieval: dense (Chroma) + lexical (BM25) candidates fused by weighted RRF."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from retrieval.bm25_store import BM25Index
from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.rerank import Reranker
from retrieval.stores import ChromaStore, CollectionNotFound, validate_collection_name
from retrieval.types import RetrievalError

logger = logging.getLogger(__name__)

Mode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[str, ...] = ("bm25", "dense", "hybrid")


@dataclass(slots=True)
class ScoredChunk:
    """One retrieved chunk with every score that ranked it.

    Attributes:
        chunk_id: Chunk id.
        doc_id: Document id.
        text: Chunk text.
        metadata: Stored metadata (source, title, page, section, ...).
        score: Final score: fused RRF score, or the reranker score when reranked.
        dense_score: Cosine similarity, when the dense side found it.
        bm25_score: BM25 score, when the lexical side found it.
        rank: 1-based position in the result list.
        rerank_score: Cross-encoder score, when reranked.
    """

    chunk_id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]
    score: float
    dense_score: float | None = None
    bm25_score: float | None = None
    rank: int = 0
    rerank_score: float | None = None

    def to_document(self) -> Document:
        """A LangChain Document whose metadata carries ids and scores."""
        meta = dict(self.metadata)
        meta.update(
            doc_id=self.doc_id,
            chunk_id=self.chunk_id,
            score=self.score,
            dense_score=self.dense_score,
            bm25_score=self.bm25_score,
            rank=self.rank,
        )
        if self.rerank_score is not None:
            meta["rerank_score"] = self.rerank_score
        return Document(page_content=self.text, metadata=meta, id=self.chunk_id)


# RRF offset. 60 is the classic value (Cormack et al., 2009, for long TREC run
# lists); over 100-candidate lists a smaller offset that lets the top ranks count
# more fused better here: SciFact-train nDCG@10 0.7160 at 10 vs 0.7059 at 60, and
# PubMedQA-dev hit@5 0.998 vs 0.996 (benchmarks/retrieval.py, benchmarks/answer.py).
DEFAULT_RRF_K = 10


def rrf_fuse(
    dense: list[tuple[str, float]],
    lexical: list[tuple[str, float]],
    *,
    rrf_k: int = DEFAULT_RRF_K,
    dense_weight: float = 1.0,
    bm25_weight: float = 1.0,
) -> list[tuple[str, float]]:
    """Weighted reciprocal rank fusion of two ranked ``(id, score)`` lists.

    ``fused(id) = dense_weight / (rrf_k + dense_rank) + bm25_weight / (rrf_k + bm25_rank)``
    with 1-based ranks; an id missing from a list gets nothing from it.

    Returns:
        ``(id, fused score)`` best first (ties keep the dense order, then lexical).
    """
    fused: dict[str, float] = {}
    for rank, (chunk_id, _) in enumerate(dense, start=1):
        fused[chunk_id] = fused.get(chunk_id, 0.0) + dense_weight / (rrf_k + rank)
    for rank, (chunk_id, _) in enumerate(lexical, start=1):
        fused[chunk_id] = fused.get(chunk_id, 0.0) + bm25_weight / (rrf_k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


class HybridRetriever(BaseRetriever):
    """Dense + BM25 retrieval over one collection, fused by weighted reciprocal rank.

    A LangChain retriever (``invoke``, ``ainvoke``, ``batch``), and a plain
    ``search()`` that returns ``ScoredChunk``s. Returned Documents carry
    ``doc_id``, ``chunk_id``, ``source``, ``title``, ``page``/``section`` (when
    known), ``score`` (fused), ``dense_score``, ``bm25_score`` and ``rank``.

    Example:
        >>> retriever = HybridRetriever.from_data_dir(Path("/tmp/ragloom"), "docs", k=5)
        >>> docs = retriever.invoke("how do I reset my password?")
        >>> docs[0].metadata["source"], docs[0].metadata["score"]
        ('/srv/docs/account.md', 0.0325)
        >>> retriever.invoke("refunds", mode="bm25", filters={"source": "/srv/docs/billing.md"})

    Attributes:
        collection: Collection to search.
        chroma: The vector store.
        bm25: The lexical index.
        embedder: Must be the model the collection was built with.
        reranker: Optional cross-encoder applied to the top ``rerank_top_n`` fused candidates.
        k: Results returned.
        mode: ``bm25`` | ``dense`` | ``hybrid``.
        fetch_k: Candidates taken from each side before fusion.
        rrf_k: RRF rank offset.
        dense_weight: Weight of the dense ranks in the fusion.
        bm25_weight: Weight of the BM25 ranks in the fusion.
        filters: Default metadata equality filters (e.g. ``{"source": ...}``, ``{"page": 3}``).
        rerank_top_n: Candidates the reranker sees.
        exact_search: Answer the dense side by an exact scan of the vector copy the
            index keeps for small collections (see ``Ingestor``); Chroma's HNSW
            otherwise, or when the index has no copy.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    collection: str
    chroma: ChromaStore
    bm25: BM25Index
    embedder: Any = Field(description="An Embedder")
    reranker: Any = Field(default=None, description="A Reranker, or None")
    k: int = 5
    mode: Mode = "hybrid"
    fetch_k: int = 50
    rrf_k: int = DEFAULT_RRF_K
    dense_weight: float = 1.0
    bm25_weight: float = 1.0
    filters: dict[str, Any] | None = None
    rerank_top_n: int = 20
    exact_search: bool = True
    _model_checked: bool = PrivateAttr(default=False)

    @field_validator("collection")
    @classmethod
    def _valid_collection(cls, value: str) -> str:
        return validate_collection_name(value)

    @field_validator("k", "fetch_k", "rrf_k", "rerank_top_n")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be > 0, got {value}")
        return value

    @field_validator("dense_weight", "bm25_weight")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    @classmethod
    def from_data_dir(
        cls,
        data_dir: Path,
        collection: str,
        *,
        embedder: Embedder | None = None,
        chroma_url: str | None = None,
        reranker: Reranker | None = None,
        **kwargs: Any,
    ) -> HybridRetriever:
        """Open the stores of a data folder (as written by ``Ingestor``).

        Raises:
            CollectionNotFound: the collection does not exist.
        """
        chroma = ChromaStore(Path(data_dir), url=chroma_url)
        bm25 = BM25Index(Path(data_dir) / "bm25")
        chroma.collection(collection)  # fail now, with a clear error, if it is missing
        if embedder is None:
            model = chroma.collection_metadata(collection).get("embedding_model")
            embedder = SentenceTransformerEmbedder(str(model or "all-MiniLM-L6-v2"))
        return cls(
            collection=collection,
            chroma=chroma,
            bm25=bm25,
            embedder=embedder,
            reranker=reranker,
            **kwargs,
        )

    def warm_up(self) -> None:
        """Load the embedding model, the BM25 index and the reranker now."""
        self.embedder.warm_up()
        self._check_model()
        if self.bm25.has_collection(self.collection):
            self.bm25.warm_up(self.collection)
        if self.reranker is not None:
            self.reranker.warm_up()

    def _check_model(self) -> None:
        if self._model_checked:
            return
        built_with = self.chroma.collection_metadata(self.collection).get("embedding_model")
        if built_with and built_with != self.embedder.model_name:
            raise RetrievalError(
                f"collection {self.collection!r} was built with {built_with!r} but the "
                f"retriever embeds queries with {self.embedder.model_name!r}"
            )
        self._model_checked = True

    def search(
        self,
        query: str,
        k: int | None = None,
        mode: str | None = None,
        filters: dict[str, Any] | None = None,
    ) -> list[ScoredChunk]:
        """Retrieve the top ``k`` chunks for ``query``.

        Args:
            query: Free text.
            k: Results wanted (default ``self.k``).
            mode: ``bm25`` | ``dense`` | ``hybrid`` (default ``self.mode``).
            filters: Metadata equality filters (default ``self.filters``); both
                sides apply them before ranking.

        Raises:
            ValueError: bad k or mode.
            CollectionNotFound: the collection is gone.
        """
        k = self.k if k is None else k
        mode = self.mode if mode is None else mode
        filters = self.filters if filters is None else filters
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not query.strip():
            return []
        n_candidates = max(k, self.rerank_top_n) if self.reranker is not None else k
        fetch = max(self.fetch_k, n_candidates) if mode == "hybrid" else n_candidates
        dense: list[tuple[str, float]] = []
        lexical: list[tuple[str, float]] = []
        payload: dict[str, tuple[str, dict[str, Any]]] = {}
        if mode in ("dense", "hybrid"):
            self._check_model()
            vector = self.embedder.embed_query(query)  # (D,)
            if self.exact_search and self.bm25.has_vectors(self.collection):
                exact = self.bm25.dense_search(self.collection, vector, fetch, filters=filters)
                for near in exact:
                    dense.append((near.chunk_id, near.score))
                    payload[near.chunk_id] = (near.text or "", near.metadata or {})
            else:
                hits = self.chroma.query(self.collection, vector, fetch, filters=filters)
                dense = [(h.chunk_id, h.score) for h in hits]
        if mode in ("bm25", "hybrid"):
            try:
                for hit in self.bm25.search(self.collection, query, fetch, filters=filters):
                    lexical.append((hit.chunk_id, hit.score))
                    payload[hit.chunk_id] = (hit.text, hit.metadata)
            except CollectionNotFound:
                if mode == "bm25":
                    raise
                logger.warning("collection %s has no BM25 index: dense only", self.collection)
        if mode == "hybrid":
            fused = rrf_fuse(
                dense,
                lexical,
                rrf_k=self.rrf_k,
                dense_weight=self.dense_weight,
                bm25_weight=self.bm25_weight,
            )
        else:
            fused = dense if mode == "dense" else lexical
        top = fused[:n_candidates]
        dense_scores = dict(dense)
        bm25_scores = dict(lexical)
        self._fill_payload(payload, [chunk_id for chunk_id, _ in top])
        results = []
        for chunk_id, score in top:
            if chunk_id not in payload:
                logger.warning("chunk %s vanished from %s; skipped", chunk_id, self.collection)
                continue
            text, meta = payload[chunk_id]
            results.append(
                ScoredChunk(
                    chunk_id=chunk_id,
                    doc_id=str(meta.get("doc_id", chunk_id.split(":", 1)[0])),
                    text=text,
                    metadata=meta,
                    score=float(score),
                    dense_score=dense_scores.get(chunk_id),
                    bm25_score=bm25_scores.get(chunk_id),
                )
            )
        if self.reranker is not None and results:
            results = self._rerank(query, results)
        results = results[:k]
        for rank, item in enumerate(results, start=1):
            item.rank = rank
        return results

    def _fill_payload(self, payload: dict[str, tuple[str, dict[str, Any]]], ids: list[str]) -> None:
        missing = [i for i in ids if i not in payload]
        if not missing:
            return
        try:
            payload.update(self.bm25.lookup(self.collection, missing))
        except CollectionNotFound:
            pass
        still = [i for i in missing if i not in payload]
        if still:  # the BM25 copy is older than Chroma (an ingest is running): ask Chroma
            payload.update(self.chroma.get(self.collection, still))

    def _rerank(self, query: str, results: list[ScoredChunk]) -> list[ScoredChunk]:
        scores = self.reranker.score(query, [r.text for r in results])
        for item, rerank_score in zip(results, scores, strict=True):
            item.metadata = {**item.metadata, "fused_score": item.score}
            item.rerank_score = rerank_score
            item.score = rerank_score
        return sorted(results, key=lambda r: -r.score)

    def _documents(self, query: str, kwargs: dict[str, Any]) -> list[Document]:
        unknown = set(kwargs) - {"k", "mode", "filters"}
        if unknown:
            raise ValueError(f"unknown retriever arguments: {', '.join(sorted(unknown))}")
        chunks = self.search(
            query, k=kwargs.get("k"), mode=kwargs.get("mode"), filters=kwargs.get("filters")
        )
        return [c.to_document() for c in chunks]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return self._documents(query, kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        # The search is CPU-bound and short: run it off the event loop.
        return await asyncio.to_thread(self._documents, query, kwargs)
