"""Throw-away evaluation indexes, cached by content.

A BEIR corpus is ingested through the real pipeline (``retrieval.Ingestor``:
chunker, embedder, Chroma + BM25) into its own data folder under a cache
folder. The folder's name is a key over everything the index depends on: the
corpus content (sha256), the chunk size and overlap, and the embedding model.
A finished index leaves an ``index.json`` marker, so the next run with the
same key opens it without re-embedding; an interrupted build is resumed (the
ingestion manifest skips documents already committed).

Each chunk carries the BEIR ``_id`` of its document in its metadata
(``corpus_id``), so hits map back to corpus documents.

Example:
    >>> index = ensure_index(dataset, IndexParams(256, 32, "all-MiniLM-L6-v2"),
    ...                      Path("~/.cache/ragloom/eval"), embedder)
    >>> index.cached, index.chunks
    (False, 5421)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eval.configs import IndexParams
from eval.dataset import BeirDataset
from eval.errors import EvalError

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
COLLECTION = "beir-corpus"
CORPUS_ID_FIELD = "corpus_id"
MARKER_FILE = "index.json"

IndexProgress = Callable[[int, int], None]
"""Called as ``progress(documents_committed, documents_total)`` while an index is built."""


@dataclass(slots=True)
class EvalIndex:
    """An evaluation index ready to be searched.

    Attributes:
        key: sha256 over corpus content, chunking parameters and embedding model.
        data_dir: The ingestion data folder holding Chroma, BM25 and the manifest.
        collection: Collection name inside it.
        params: Chunking parameters and embedding model.
        documents: Documents in the index.
        chunks: Chunks in the index.
        cached: True when an existing index was reused (no embedding done).
        build_seconds: Seconds spent building (0 when cached).
    """

    key: str
    data_dir: Path
    collection: str
    params: IndexParams
    documents: int
    chunks: int
    cached: bool
    build_seconds: float


def index_key(corpus_hash: str, params: IndexParams) -> str:
    """The cache key of an index: sha256 over corpus hash, chunking and model."""
    payload = json.dumps(
        {"format": INDEX_FORMAT, "corpus": corpus_hash, **asdict(params)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _source_documents(dataset: BeirDataset) -> Iterator[Any]:
    from retrieval import SourceDocument, TextBlock

    for doc_id, doc in dataset.corpus.items():
        title, text = doc["title"].strip(), doc["text"].strip()
        # Index title + text (BEIR's convention); the title also stays a field.
        body = f"{title}\n\n{text}" if title and text else (title or text)
        yield SourceDocument(
            source=f"beir://{doc_id}",
            title=title or doc_id,
            blocks=[TextBlock(body)],
            metadata={CORPUS_ID_FIELD: doc_id},
        )


def _read_marker(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable index marker %s: %s", path, exc)
        return None
    if not isinstance(marker, dict) or marker.get("key") != key:
        logger.warning("index marker %s is for another key; rebuilding", path)
        return None
    return marker


def ensure_index(
    dataset: BeirDataset,
    params: IndexParams,
    cache_dir: Path,
    embedder: Any,
    progress: IndexProgress | None = None,
) -> EvalIndex:
    """Open the cached index for ``(dataset corpus, params)``, building it when missing.

    Args:
        dataset: The loaded dataset (only its corpus is indexed).
        params: Chunk size, overlap and embedding model.
        cache_dir: Parent folder of all cached evaluation indexes.
        embedder: A ``retrieval.Embedder`` for ``params.embedding_model``.
        progress: Called with (documents committed, documents total) while building.

    Raises:
        EvalError: ingestion failed for some documents, or the cache is locked by
            another run (the message says which).
    """
    from retrieval import Ingestor, RetrievalError

    key = index_key(dataset.corpus_hash(), params)
    folder = Path(cache_dir).expanduser() / key[:24]
    marker_path = folder / MARKER_FILE
    marker = _read_marker(marker_path, key)
    if marker is not None:
        logger.info("reusing evaluation index %s (%s chunks)", folder, marker.get("chunks"))
        return EvalIndex(
            key=key,
            data_dir=folder,
            collection=COLLECTION,
            params=params,
            documents=int(marker.get("documents", 0)),
            chunks=int(marker.get("chunks", 0)),
            cached=True,
            build_seconds=0.0,
        )

    total = len(dataset.corpus)
    logger.info("building evaluation index %s for %d documents", folder, total)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    ingestor = Ingestor(
        folder,
        embedder=embedder,
        chunk_size=params.chunk_size,
        chunk_overlap=params.chunk_overlap,
        progress=(lambda done, _chunks: progress(done, total)) if progress else None,
    )
    try:
        report = ingestor.ingest_documents(_source_documents(dataset), COLLECTION)
        record = ingestor.manifest.collection(COLLECTION)
    except RetrievalError as exc:
        raise EvalError(f"building the evaluation index in {folder} failed: {exc}") from exc
    finally:
        ingestor.close()
    failed = report.failed
    if failed:
        first = failed[0]
        raise EvalError(
            f"{len(failed)} documents could not be indexed; first: {first.path}: {first.reason}"
        )
    documents = record.documents if record is not None else total
    chunks = record.chunks if record is not None else report.chunks_added
    seconds = time.perf_counter() - started
    marker_path.write_text(
        json.dumps(
            {
                "key": key,
                "format": INDEX_FORMAT,
                "dataset": str(dataset.root),
                "documents": documents,
                "chunks": chunks,
                "build_seconds": seconds,
                **asdict(params),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    if progress:
        progress(total, total)
    logger.info("built %s: %d documents, %d chunks in %.1fs", folder, documents, chunks, seconds)
    return EvalIndex(
        key=key,
        data_dir=folder,
        collection=COLLECTION,
        params=params,
        documents=documents,
        chunks=chunks,
        cached=False,
        build_seconds=seconds,
    )
