"""ragloom retrieval: load, chunk, embed, store (Chroma + BM25), retrieve (hybrid), rerank.

Public surface::

    from retrieval import Ingestor, HybridRetriever, SentenceTransformerEmbedder

    report = Ingestor(data_dir).ingest([Path("docs/")], collection="docs")
    retriever = HybridRetriever.from_data_dir(data_dir, "docs", k=5)
    docs = retriever.invoke("how do I reset my password?")
"""

from retrieval.bm25_store import BM25Index, LexicalHit
from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.hybrid import MODES, HybridRetriever, ScoredChunk, rrf_fuse
from retrieval.ingest import (
    FileReport,
    IngestionReport,
    Ingestor,
    WriterLock,
    WriterLocked,
    doc_id_for,
)
from retrieval.manifest import Manifest
from retrieval.models import ModelNotAvailable, offline_hint, resolve_model_path
from retrieval.rerank import CrossEncoderReranker, Reranker
from retrieval.stores import (
    ChromaStore,
    CollectionNotFound,
    DenseHit,
    InvalidCollectionName,
    StoreError,
    validate_collection_name,
)
from retrieval.types import Chunk, LoaderError, RetrievalError, SourceDocument, TextBlock

Retriever = HybridRetriever

__all__ = [
    "MODES",
    "BM25Index",
    "ChromaStore",
    "Chunk",
    "CollectionNotFound",
    "CrossEncoderReranker",
    "DenseHit",
    "Embedder",
    "FileReport",
    "HybridRetriever",
    "IngestionReport",
    "Ingestor",
    "InvalidCollectionName",
    "LexicalHit",
    "LoaderError",
    "Manifest",
    "ModelNotAvailable",
    "Reranker",
    "RetrievalError",
    "Retriever",
    "ScoredChunk",
    "SentenceTransformerEmbedder",
    "SourceDocument",
    "StoreError",
    "TextBlock",
    "WriterLock",
    "WriterLocked",
    "doc_id_for",
    "offline_hint",
    "resolve_model_path",
    "rrf_fuse",
    "validate_collection_name",
]
