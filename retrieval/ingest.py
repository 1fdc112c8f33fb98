"""Idempotent, crash-safe ingestion: files -> documents -> chunks -> Chroma + BM25.

The commit protocol (one writer per data folder, held by a file lock):

1. the manifest records the batch's documents as ``pending`` with their new chunk ids;
2. Chroma ``add`` of the chunk ids not already present (never re-upserted);
3. one manifest transaction commits the documents: new chunk rows (the BM25
   source) replace the old ones, whose ids move to ``garbage``;
4. the garbage ids are deleted from Chroma;
5. at the end of the run the BM25 index is rebuilt from the committed chunks and
   swapped in atomically.

Chunk ids carry the document version (``{doc_id}:{hash8}:{index}``), so a changed
document's new chunks never collide with its old ones: until step 3 the old
version is the committed one, after it the new one is. A run killed at any
point leaves ``pending``/``garbage`` rows (and a ``dirty`` collection); the next
run's ``recover`` deletes the stray chunks from Chroma, reconciles Chroma with
the manifest, and rebuilds BM25, so each document ends committed to both stores
or to neither.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from retrieval.bm25_store import DEFAULT_EXACT_SEARCH_MAX_CHUNKS, BM25Index
from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.manifest import ChunkRow, DocumentCommit, Manifest
from retrieval.stores import (
    ChromaStore,
    CollectionNotFound,
    StoreError,
    validate_collection_name,
)
from retrieval.types import Chunk, LoaderError, RetrievalError, SourceDocument

logger = logging.getLogger(__name__)

FileStatus = Literal["added", "updated", "unchanged", "pruned", "failed"]
RESERVED_METADATA = ("doc_id", "chunk_id", "source", "title", "index", "page", "section")
# Formats whose parsers can hang or blow up on hostile input parse in a child process.
ISOLATED_SUFFIXES = frozenset({".pdf", ".docx"})


class WriterLocked(RetrievalError):
    """Another process is writing to the same data folder."""


class Chunker(Protocol):
    """Splits a document into chunks whose ids are ``f"{doc_id}:{index}"``."""

    def split(self, doc: SourceDocument, doc_id: str) -> list[Chunk]:
        """Chunks of the document, in order."""
        ...


Loader = Callable[[Path], list[SourceDocument]]


def doc_id_for(source: str) -> str:
    """Stable document id derived from its source (16 hex chars)."""
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def source_path(source: str) -> Path | None:
    """The file behind a source string (``path#row=N`` -> path), or None for URLs."""
    if "://" in source:
        return None
    return Path(source.split("#", 1)[0])


class WriterLock:
    """Exclusive ``fcntl.flock`` on ``data_dir/.writer.lock`` (released on exit or process death).

    Raises:
        WriterLocked: when another process holds it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / ".writer.lock"
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WriterLocked(
                f"another ragloom writer (pid {holder}) holds {self.path}; "
                "wait for it to finish and try again"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass(slots=True)
class FileReport:
    """What happened to one file (or one pruned source).

    Attributes:
        path: The file path (or source string).
        status: added | updated | unchanged | pruned | failed.
        documents: Documents the file produced (rows for tables).
        chunks: Chunks written for it in this run.
        reason: Why it failed (status ``failed``) else None.
    """

    path: str
    status: FileStatus
    documents: int = 0
    chunks: int = 0
    reason: str | None = None


@dataclass(slots=True)
class IngestionReport:
    """Outcome of one ingestion run."""

    collection: str
    files: list[FileReport] = field(default_factory=list)
    chunks_added: int = 0
    chunks_deleted: int = 0
    recovered_documents: int = 0
    seconds: float = 0.0

    def count(self, status: FileStatus) -> int:
        """Number of files with this status."""
        return sum(1 for f in self.files if f.status == status)

    @property
    def failed(self) -> list[FileReport]:
        """The files that failed."""
        return [f for f in self.files if f.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed

    def summary(self) -> str:
        """One line: counts per status, chunks and seconds."""
        parts = [f"{s} {self.count(s)}" for s in ("added", "updated", "unchanged", "pruned")]
        parts.append(f"failed {len(self.failed)}")
        return (
            f"{self.collection}: " + ", ".join(parts) + f"; chunks +{self.chunks_added}"
            f" -{self.chunks_deleted}; {self.seconds:.1f}s"
        )


@dataclass(slots=True)
class _PendingDoc:
    doc_id: str
    doc: SourceDocument
    content_hash: str
    chunks: list[Chunk]
    file_key: str
    is_update: bool


class Ingestor:
    """Loads, chunks, embeds and commits documents into a named collection.

    Example:
        >>> ingestor = Ingestor(Path("/tmp/ragloom"))
        >>> report = ingestor.ingest([Path("docs/")], collection="docs", prune=True)
        >>> print(report.summary())
        docs: added 12, updated 0, unchanged 0, pruned 0, failed 0; chunks +340 -0; 21.3s

    Args:
        data_dir: Where the manifest, Chroma (unless ``chroma_url``) and BM25 live.
        embedder: Embedding model; default ``SentenceTransformerEmbedder()``.
        chunker: Chunker; default ``TokenChunker(chunk_size, chunk_overlap)``.
        loader: ``path -> documents``; default the format loaders (PDF/DOCX in a
            child process with a parse timeout, text formats in-process for speed).
        chroma_url: Use a Chroma server instead of the embedded store.
        batch_chunks: Chunks accumulated across documents before one embedding
            call and one group commit (large batches keep the model busy).
        chunk_size: Tokens per chunk for the default chunker.
        chunk_overlap: Overlapping tokens for the default chunker.
        progress: Called as ``progress(committed_docs, chunks_added)`` after each batch.
        exact_search_max_chunks: Collections up to this many chunks keep a copy of
            their vectors beside the BM25 index, so queries scan them exactly instead
            of asking Chroma's HNSW (faster up to ~20k chunks of 384 dims on a small
            CPU, and exact); 0 turns the copy off.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        embedder: Embedder | None = None,
        chunker: Chunker | None = None,
        loader: Loader | None = None,
        chroma_url: str | None = None,
        batch_chunks: int = 512,
        chunk_size: int = 256,
        chunk_overlap: int = 32,
        progress: Callable[[int, int], None] | None = None,
        exact_search_max_chunks: int = DEFAULT_EXACT_SEARCH_MAX_CHUNKS,
    ) -> None:
        if batch_chunks <= 0:
            raise ValueError(f"batch_chunks must be > 0, got {batch_chunks}")
        if exact_search_max_chunks < 0:
            raise ValueError(f"exact_search_max_chunks must be >= 0, got {exact_search_max_chunks}")
        self.exact_search_max_chunks = exact_search_max_chunks
        self.data_dir = Path(data_dir)
        self.embedder: Embedder = embedder or SentenceTransformerEmbedder()
        self._chunker = chunker
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.loader = loader or default_loader()
        self.chroma = ChromaStore(self.data_dir, url=chroma_url)
        self.bm25 = BM25Index(self.data_dir / "bm25")
        self.batch_chunks = batch_chunks
        self.progress = progress
        self._manifest: Manifest | None = None

    @property
    def chunker(self) -> Chunker:
        """The chunker (the default one is built on first use)."""
        if self._chunker is None:
            from retrieval.chunking import TokenChunker

            self._chunker = TokenChunker(
                self.embedder.model_name,
                chunk_size=self.chunk_size,
                chunk_overlap=self.chunk_overlap,
            )
        return self._chunker

    @property
    def manifest(self) -> Manifest:
        """The manifest of this data folder (opened on first use)."""
        if self._manifest is None:
            self._manifest = Manifest(self.data_dir / "manifest.sqlite")
        return self._manifest

    def close(self) -> None:
        """Close the manifest."""
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None

    # -- collections -------------------------------------------------------------

    def create_collection(self, name: str) -> None:
        """Create an empty collection in the manifest and both stores (idempotent)."""
        validate_collection_name(name)
        with WriterLock(self.data_dir):
            self._ensure_collection(name)

    def _ensure_collection(self, name: str) -> None:
        record = self.manifest.collection(name)
        if record is None:
            self.embedder.warm_up()
            model, dim = self.embedder.model_name, self.embedder.dimension
            self.chroma.create_collection(
                name, metadata={"embedding_model": model, "dimension": dim}
            )
            self.bm25.create_collection(name)
            self.manifest.add_collection(name, model, dim)
            return
        if record.embedding_model != self.embedder.model_name:
            raise RetrievalError(
                f"collection {name!r} was built with embedding model {record.embedding_model!r}, "
                f"not {self.embedder.model_name!r}; use that model or a new collection"
            )
        if not self.chroma.has_collection(name):
            self.chroma.create_collection(
                name,
                metadata={"embedding_model": record.embedding_model, "dimension": record.dimension},
            )
            self.manifest.set_dirty(name, True)  # the reconcile re-adds what is missing
        self.bm25.create_collection(name)

    def delete_collection(self, name: str) -> None:
        """Delete a collection from both stores and the manifest.

        Raises:
            CollectionNotFound: it exists nowhere.
        """
        validate_collection_name(name)
        with WriterLock(self.data_dir):
            found = self.manifest.collection(name) is not None
            self.manifest.drop_collection(name)
            for store in (self.chroma, self.bm25):
                try:
                    store.delete_collection(name)
                    found = True
                except CollectionNotFound:
                    pass
            if not found:
                raise CollectionNotFound(f"collection {name!r} does not exist")

    # -- recovery ----------------------------------------------------------------

    def recover(self, collection: str) -> int:
        """Undo what an interrupted run left behind; returns the documents rolled back.

        Pending documents lose their uncommitted chunks in Chroma; garbage ids are
        deleted; if the last run did not finish, Chroma is reconciled with the
        manifest (stray ids deleted, documents with missing chunks forgotten so
        they are ingested again) and BM25 is rebuilt. Call with the writer lock held.
        """
        manifest = self.manifest
        record = manifest.collection(collection)
        if record is None:
            raise CollectionNotFound(f"collection {collection!r} does not exist")
        pending = manifest.pending(collection)
        committed = manifest.committed_chunk_ids(collection)
        if pending:
            stray = [i for ids in pending.values() for i in ids if i not in committed]
            self.chroma.delete(collection, stray)
            manifest.clear_pending(collection, list(pending))
            logger.warning(
                "recovered %s: rolled back %d unfinished documents (%d chunks)",
                collection,
                len(pending),
                len(stray),
            )
        self._collect_garbage(collection)
        if record.dirty or pending:
            in_chroma = self.chroma.all_ids(collection)
            stray_ids = sorted(in_chroma - committed)
            if stray_ids:
                logger.warning("reconcile %s: deleting %d stray chunks", collection, len(stray_ids))
                self.chroma.delete(collection, stray_ids)
            missing = committed - in_chroma
            if missing:
                docs = sorted({i.split(":", 1)[0] for i in missing})
                logger.warning(
                    "reconcile %s: %d documents lost chunks in Chroma; they will be re-ingested",
                    collection,
                    len(docs),
                )
                self.chroma.delete(collection, manifest.remove_documents(collection, docs))
                manifest.clear_garbage(collection, manifest.garbage(collection))
            self.rebuild_bm25(collection)
            manifest.set_dirty(collection, False)
        return len(pending)

    def _collect_garbage(self, collection: str) -> int:
        garbage = self.manifest.garbage(collection)
        if garbage:
            self.chroma.delete(collection, garbage)
            self.manifest.clear_garbage(collection, garbage)
        return len(garbage)

    def rebuild_bm25(self, collection: str) -> None:
        """Rebuild the collection's BM25 index from the manifest's committed chunks.

        Collections of up to ``exact_search_max_chunks`` chunks also get a copy of
        their vectors (read back from Chroma) for exact dense search.
        """
        ids, texts, metas = self.manifest.committed_chunks(collection)
        vectors = None
        if 0 < len(ids) <= self.exact_search_max_chunks:
            try:
                vectors = self.chroma.embeddings(collection, ids)
            except StoreError as exc:  # Chroma lags the manifest: HNSW serves dense queries
                logger.warning("%s: no exact-search copy of the vectors: %s", collection, exc)
        self.bm25.build(collection, ids, texts, metas, vectors=vectors)

    def _wants_vectors(self, collection: str) -> bool:
        """Whether the live index lacks the vector copy it should have (an index
        written before the copy existed, or under a lower limit)."""
        count = self.bm25.count(collection)
        return 0 < count <= self.exact_search_max_chunks and not self.bm25.has_vectors(collection)

    # -- ingestion ---------------------------------------------------------------

    def ingest(
        self,
        paths: Sequence[Path | str],
        collection: str,
        *,
        prune: bool = False,
        recursive: bool = True,
    ) -> IngestionReport:
        """Ingest files and folders into a collection (created when missing).

        Unchanged documents are skipped, changed ones replaced; bad files are
        reported as failed and never stop the batch. With ``prune``, documents
        whose source file is gone (or that a re-read file no longer yields) are
        removed.
        """
        from retrieval.loaders import iter_files

        files = list(iter_files([Path(p) for p in paths], recursive=recursive))
        return self._run(collection, _load_files(files, self.loader), prune=prune)

    def ingest_documents(
        self, documents: Iterable[SourceDocument], collection: str, *, prune: bool = False
    ) -> IngestionReport:
        """Ingest already-loaded documents (one report line per source)."""
        items = ((doc.source, [doc], None) for doc in documents)
        return self._run(collection, items, prune=prune)

    def _run(
        self,
        collection: str,
        items: Iterable[tuple[str, list[SourceDocument], str | None]],
        *,
        prune: bool,
    ) -> IngestionReport:
        validate_collection_name(collection)
        started = time.perf_counter()
        report = IngestionReport(collection)
        with WriterLock(self.data_dir):
            self._ensure_collection(collection)
            report.recovered_documents = self.recover(collection)
            self.manifest.set_dirty(collection, True)
            run = _Run(self, collection, report)
            for key, docs, error in items:
                run.add_file(key, docs, error)
            run.flush()
            if prune:
                run.prune()
            if run.changed or report.recovered_documents or self._wants_vectors(collection):
                self.rebuild_bm25(collection)
            self.manifest.set_dirty(collection, False)
        report.seconds = time.perf_counter() - started
        logger.info("%s", report.summary())
        return report


class _Run:
    """State of one ingestion run: the batch being accumulated and the report."""

    def __init__(self, ingestor: Ingestor, collection: str, report: IngestionReport) -> None:
        self.ing = ingestor
        self.collection = collection
        self.report = report
        self.known = ingestor.manifest.documents(collection)
        self.seen_docs: set[str] = set()
        self.loaded_sources: set[str] = set()
        self.batch: list[_PendingDoc] = []
        self.batch_chunks = 0
        self.files: dict[str, FileReport] = {}
        self.committed_docs = 0
        self.changed = False

    def add_file(self, key: str, docs: list[SourceDocument], error: str | None) -> None:
        if error is not None:
            self.report.files.append(FileReport(key, "failed", reason=error))
            return
        entry = FileReport(key, "unchanged", documents=len(docs))
        self.files[key] = entry
        self.report.files.append(entry)
        for doc in docs:
            self.loaded_sources.add(doc.source.split("#", 1)[0])
            doc_id = doc_id_for(doc.source)
            if doc_id in self.seen_docs:
                continue  # the same source twice in one run: first one wins
            self.seen_docs.add(doc_id)
            content_hash = doc.content_hash
            previous = self.known.get(doc_id)
            if previous is not None and previous.content_hash == content_hash:
                continue
            try:
                chunks = self.ing.chunker.split(doc, doc_id)
            except (RetrievalError, ValueError) as exc:
                entry.status, entry.reason = "failed", f"chunking failed: {exc}"
                continue
            chunks = [_versioned(c, doc_id, content_hash) for c in chunks]
            self.batch.append(
                _PendingDoc(doc_id, doc, content_hash, chunks, key, previous is not None)
            )
            self.batch_chunks += len(chunks)
            if self.batch_chunks >= self.ing.batch_chunks:
                self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch, self.batch_chunks = self.batch, [], 0
        chunks = [c for p in batch for c in p.chunks]
        vectors = self.ing.embedder.embed_documents([c.text for c in chunks])  # (N, D)
        manifest, chroma = self.ing.manifest, self.ing.chroma
        manifest.begin(self.collection, [(p.doc_id, [c.chunk_id for c in p.chunks]) for p in batch])
        metadatas = [chunk_metadata(c) for c in chunks]
        added = chroma.add(
            self.collection,
            [c.chunk_id for c in chunks],
            vectors,
            [c.text for c in chunks],
            metadatas,
        )
        commits = []
        offset = 0
        for p in batch:
            rows = [
                ChunkRow(c.chunk_id, c.index, c.text, metadatas[offset + j])
                for j, c in enumerate(p.chunks)
            ]
            offset += len(p.chunks)
            commits.append(
                DocumentCommit(p.doc_id, p.doc.source, p.doc.title, p.content_hash, rows)
            )
        garbage = manifest.commit(self.collection, commits)
        if garbage:
            chroma.delete(self.collection, garbage)
            manifest.clear_garbage(self.collection, garbage)
        self.changed = True
        self.report.chunks_added += added
        self.report.chunks_deleted += len(garbage)
        for p in batch:
            entry = self.files[p.file_key]
            entry.chunks += len(p.chunks)
            if entry.status == "failed":
                continue
            if p.is_update:
                entry.status = "updated"
            elif entry.status != "updated":
                entry.status = "added"
        self.committed_docs += len(batch)
        logger.info("%s: committed %d documents", self.collection, self.committed_docs)
        if self.ing.progress is not None:
            self.ing.progress(self.committed_docs, self.report.chunks_added)

    def prune(self) -> None:
        gone: dict[str, list[str]] = {}
        for doc_id, record in self.ing.manifest.documents(self.collection).items():
            if doc_id in self.seen_docs:
                continue
            path = source_path(record.source)
            if path is None:
                continue
            reread = str(path) in self.loaded_sources
            if reread or not path.exists():
                gone.setdefault(str(path), []).append(doc_id)
        if not gone:
            return
        doc_ids = [d for ids in gone.values() for d in ids]
        garbage = self.ing.manifest.remove_documents(self.collection, doc_ids)
        self.ing.chroma.delete(self.collection, garbage)
        self.ing.manifest.clear_garbage(self.collection, garbage)
        self.report.chunks_deleted += len(garbage)
        self.changed = True
        for gone_path, ids in sorted(gone.items()):
            if gone_path not in self.files:
                self.report.files.append(FileReport(gone_path, "pruned", documents=len(ids)))
            elif self.files[gone_path].status == "unchanged":
                self.files[gone_path].status = "updated"


def _versioned(chunk: Chunk, doc_id: str, content_hash: str) -> Chunk:
    chunk.chunk_id = f"{doc_id}:{content_hash[:8]}:{chunk.index}"
    chunk.doc_id = doc_id
    return chunk


def chunk_metadata(chunk: Chunk) -> dict[str, Any]:
    """The metadata stored with a chunk in both stores (no None values)."""
    meta: dict[str, Any] = {
        k: v for k, v in chunk.metadata.items() if k not in RESERVED_METADATA and v is not None
    }
    meta.update(
        doc_id=chunk.doc_id,
        chunk_id=chunk.chunk_id,
        source=chunk.source,
        title=chunk.title,
        index=chunk.index,
    )
    if chunk.page is not None:
        meta["page"] = chunk.page
    if chunk.section:
        meta["section"] = chunk.section
    return meta


def default_loader(
    limits: Any = None, table: Any = None, isolate: frozenset[str] = ISOLATED_SUFFIXES
) -> Loader:
    """The format loaders: suffixes in ``isolate`` parse in a child process with a timeout.

    Text formats (txt, md, rst, html, csv, jsonl) load in-process: a child process
    per small file would cost more than the parse.
    """

    def load(path: Path) -> list[SourceDocument]:
        from retrieval.loaders import load_file, load_file_isolated

        if path.suffix.lower() in isolate:
            return list(load_file_isolated(path, limits=limits, table=table))
        return list(load_file(path, limits=limits, table=table))

    return load


def _load_files(
    files: Iterable[Path], loader: Loader
) -> Iterator[tuple[str, list[SourceDocument], str | None]]:
    for path in files:
        key = str(path.resolve())
        try:
            yield key, loader(path), None
        except (LoaderError, OSError, StoreError) as exc:
            logger.warning("skipping %s: %s", path, exc)
            yield key, [], str(exc)
