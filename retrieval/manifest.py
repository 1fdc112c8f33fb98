"""The ingestion manifest: a small SQLite database that makes ingestion crash-safe.

One file per data folder (``data_dir/"manifest.sqlite"``, WAL mode). It records,
per collection, which documents are committed (source, content hash, chunk
ids and chunk texts), which are in flight (``pending``), and which chunk ids
must still be deleted from Chroma (``garbage``). The chunk texts are the
source the BM25 index is rebuilt from.

A document moves ``pending -> committed`` in one SQLite transaction, after its
chunks are in Chroma; ``Ingestor.recover`` rolls back whatever a killed run
left pending. See ``retrieval.ingest`` for the whole protocol.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.stores import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    created_at REAL NOT NULL,
    dirty INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    source TEXT NOT NULL,
    title TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    n_chunks INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (collection, doc_id)
);
CREATE TABLE IF NOT EXISTS chunks (
    collection TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (collection, doc_id);
CREATE TABLE IF NOT EXISTS pending (
    collection TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    chunk_ids TEXT NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (collection, doc_id)
);
CREATE TABLE IF NOT EXISTS garbage (
    collection TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    PRIMARY KEY (collection, chunk_id)
);
"""


@dataclass(slots=True)
class CollectionRecord:
    """A collection as the manifest knows it."""

    name: str
    embedding_model: str
    dimension: int
    documents: int
    chunks: int
    dirty: bool


@dataclass(slots=True)
class DocumentRecord:
    """A committed document."""

    doc_id: str
    source: str
    title: str
    content_hash: str
    n_chunks: int


@dataclass(slots=True)
class ChunkRow:
    """A chunk to commit: id, position, text and metadata."""

    chunk_id: str
    index: int
    text: str
    metadata: dict[str, Any]


@dataclass(slots=True)
class DocumentCommit:
    """Everything the manifest records when a document is committed."""

    doc_id: str
    source: str
    title: str
    content_hash: str
    chunks: list[ChunkRow]


class Manifest:
    """Per-data-folder record of committed, pending and garbage state.

    Args:
        path: The SQLite file (created with its tables when missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process kills
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"manifest {self.path} is unusable: {exc}") from exc

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- collections -------------------------------------------------------------

    def add_collection(self, name: str, embedding_model: str, dimension: int) -> None:
        """Record a new collection (no-op when it exists)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO collections (name, embedding_model, dimension, created_at)"
                " VALUES (?, ?, ?, ?)",
                (name, embedding_model, dimension, time.time()),
            )

    def drop_collection(self, name: str) -> None:
        """Forget a collection and everything recorded for it."""
        with self._tx() as db:
            for table in ("collections", "documents", "chunks", "pending", "garbage"):
                column = "name" if table == "collections" else "collection"
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

    def collection(self, name: str) -> CollectionRecord | None:
        """The record of one collection, or None."""
        row = self._db.execute(
            "SELECT name, embedding_model, dimension, dirty FROM collections WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        docs = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n_chunks), 0) FROM documents WHERE collection = ?",
            (name,),
        ).fetchone()
        return CollectionRecord(
            row[0], row[1], int(row[2]), int(docs[0]), int(docs[1]), bool(row[3])
        )

    def collections(self) -> list[CollectionRecord]:
        """All recorded collections, sorted by name."""
        names = [r[0] for r in self._db.execute("SELECT name FROM collections ORDER BY name")]
        return [c for c in (self.collection(n) for n in names) if c is not None]

    def set_dirty(self, name: str, dirty: bool) -> None:
        """Mark a run in progress (True) or finished cleanly (False)."""
        with self._tx() as db:
            db.execute("UPDATE collections SET dirty = ? WHERE name = ?", (int(dirty), name))

    # -- documents ---------------------------------------------------------------

    def documents(self, collection: str) -> dict[str, DocumentRecord]:
        """Committed documents by doc_id."""
        rows = self._db.execute(
            "SELECT doc_id, source, title, content_hash, n_chunks FROM documents"
            " WHERE collection = ?",
            (collection,),
        )
        return {r[0]: DocumentRecord(r[0], r[1], r[2], r[3], int(r[4])) for r in rows}

    def committed_chunk_ids(self, collection: str) -> set[str]:
        """Ids of every committed chunk."""
        rows = self._db.execute("SELECT chunk_id FROM chunks WHERE collection = ?", (collection,))
        return {r[0] for r in rows}

    def committed_chunks(
        self, collection: str
    ) -> tuple[list[str], list[str], list[dict[str, Any]]]:
        """(ids, texts, metadatas) of every committed chunk, in document order."""
        ids: list[str] = []
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        rows = self._db.execute(
            "SELECT chunk_id, text, metadata FROM chunks WHERE collection = ? ORDER BY doc_id, idx",
            (collection,),
        )
        for chunk_id, text, meta in rows:
            ids.append(chunk_id)
            texts.append(text)
            metas.append(json.loads(meta))
        return ids, texts, metas

    # -- the commit protocol -----------------------------------------------------

    def begin(self, collection: str, pending: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Record documents as in flight: ``(doc_id, new chunk ids)`` pairs."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO pending (collection, doc_id, chunk_ids, started_at)"
                " VALUES (?, ?, ?, ?)",
                [(collection, doc_id, json.dumps(list(ids)), now) for doc_id, ids in pending],
            )

    def commit(self, collection: str, docs: Sequence[DocumentCommit]) -> list[str]:
        """Commit documents whose chunks are in the vector store.

        In one transaction: their previous chunks move to ``garbage``, the new
        chunks and document rows are written, the pending rows are removed.

        Returns:
            The chunk ids that became garbage (to delete from the vector store).
        """
        now = time.time()
        garbage: list[str] = []
        with self._tx() as db:
            for doc in docs:
                new_ids = {c.chunk_id for c in doc.chunks}
                old = [
                    r[0]
                    for r in db.execute(
                        "SELECT chunk_id FROM chunks WHERE collection = ? AND doc_id = ?",
                        (collection, doc.doc_id),
                    )
                ]
                stale = [i for i in old if i not in new_ids]
                garbage.extend(stale)
                db.executemany(
                    "INSERT OR IGNORE INTO garbage (collection, chunk_id) VALUES (?, ?)",
                    [(collection, i) for i in stale],
                )
                db.execute(
                    "DELETE FROM chunks WHERE collection = ? AND doc_id = ?",
                    (collection, doc.doc_id),
                )
                db.executemany(
                    "INSERT INTO chunks (collection, chunk_id, doc_id, idx, text, metadata)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            collection,
                            c.chunk_id,
                            doc.doc_id,
                            c.index,
                            c.text,
                            json.dumps(c.metadata),
                        )
                        for c in doc.chunks
                    ],
                )
                db.execute(
                    "INSERT OR REPLACE INTO documents (collection, doc_id, source, title,"
                    " content_hash, n_chunks, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        collection,
                        doc.doc_id,
                        doc.source,
                        doc.title,
                        doc.content_hash,
                        len(doc.chunks),
                        now,
                    ),
                )
                db.execute(
                    "DELETE FROM pending WHERE collection = ? AND doc_id = ?",
                    (collection, doc.doc_id),
                )
        return garbage

    def remove_documents(self, collection: str, doc_ids: Sequence[str]) -> list[str]:
        """Forget committed documents; their chunk ids move to ``garbage`` and are returned."""
        garbage: list[str] = []
        with self._tx() as db:
            for doc_id in doc_ids:
                ids = [
                    r[0]
                    for r in db.execute(
                        "SELECT chunk_id FROM chunks WHERE collection = ? AND doc_id = ?",
                        (collection, doc_id),
                    )
                ]
                garbage.extend(ids)
                db.executemany(
                    "INSERT OR IGNORE INTO garbage (collection, chunk_id) VALUES (?, ?)",
                    [(collection, i) for i in ids],
                )
                db.execute(
                    "DELETE FROM chunks WHERE collection = ? AND doc_id = ?", (collection, doc_id)
                )
                db.execute(
                    "DELETE FROM documents WHERE collection = ? AND doc_id = ?",
                    (collection, doc_id),
                )
        return garbage

    def pending(self, collection: str) -> dict[str, list[str]]:
        """Documents left in flight: doc_id -> the chunk ids they were adding."""
        rows = self._db.execute(
            "SELECT doc_id, chunk_ids FROM pending WHERE collection = ?", (collection,)
        )
        return {r[0]: json.loads(r[1]) for r in rows}

    def clear_pending(self, collection: str, doc_ids: Sequence[str]) -> None:
        """Drop pending rows (after their stray chunks are gone)."""
        with self._tx() as db:
            db.executemany(
                "DELETE FROM pending WHERE collection = ? AND doc_id = ?",
                [(collection, d) for d in doc_ids],
            )

    def garbage(self, collection: str) -> list[str]:
        """Chunk ids still to delete from the vector store."""
        rows = self._db.execute("SELECT chunk_id FROM garbage WHERE collection = ?", (collection,))
        return [r[0] for r in rows]

    def clear_garbage(self, collection: str, chunk_ids: Sequence[str]) -> None:
        """Forget garbage ids once they are deleted from the vector store."""
        with self._tx() as db:
            db.executemany(
                "DELETE FROM garbage WHERE collection = ? AND chunk_id = ?",
                [(collection, i) for i in chunk_ids],
            )
