"""The lexical index: bm25s over stemmed, stopword-free tokens, saved beside Chroma.

Layout of one collection (``data_dir/"bm25"/<collection>/``)::

    CURRENT            name of the live version folder (replaced atomically)
    v-<stamp>/         bm25s arrays + vocab, chunks.jsonl (id, text, metadata),
                       vectors.npy (optional: the chunks' unit embeddings, float32)

A version may also hold the chunks' embeddings, copied from Chroma at build
time. For small collections an exact scan of them (one matrix-vector product)
is several times faster than Chroma's HNSW query and never misses a neighbour;
it also answers from the same committed snapshot as the lexical side.

bm25s cannot delete documents, so the index is rebuilt from the committed
chunks (the ingestion manifest keeps their texts) and swapped in by rewriting
``CURRENT`` with ``os.replace``: a reader sees the old or the new version, never
a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.stores import CollectionNotFound, DenseHit, StoreError, validate_collection_name
from retrieval.vector_scan import VectorScan, top_positions, unit_rows

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
_CURRENT = "CURRENT"
_CHUNKS = "chunks.jsonl"
_VECTORS = "vectors.npy"
# Above this many chunks an exact scan of 384-dim vectors falls out of a small
# CPU's cache and gets slower than Chroma's HNSW (measured on a 2-core EPYC:
# 0.2 ms at 10k chunks, 2.6 ms at 30k, against 2.5-3 ms for Chroma at k=100).
DEFAULT_EXACT_SEARCH_MAX_CHUNKS = 20_000
_EMPTY = "-"  # CURRENT holds this when the collection has no chunks
_local = threading.local()


def _stopwords() -> frozenset[str]:
    from bm25s.tokenization import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def bm25_tokenize(text: str) -> list[str]:
    """Lower-case word tokens, English stopwords removed, Snowball-stemmed."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        import Stemmer

        stemmer = _local.stemmer = Stemmer.Stemmer("english")
        _local.stopwords = _stopwords()
    stop = _local.stopwords
    words = [w for w in _TOKEN_RE.findall(text.lower()) if w not in stop]
    return list(stemmer.stemWords(words))


@dataclass(slots=True)
class LexicalHit:
    """One BM25 result: chunk id, BM25 score, text and metadata."""

    chunk_id: str
    score: float
    text: str
    metadata: dict[str, Any]


@dataclass(slots=True)
class _Loaded:
    version: str
    retriever: Any  # bm25s.BM25, or None when empty
    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, Any]]
    vectors: np.ndarray | None = None  # (N, D) float32, unit rows
    masks: dict[tuple[str, Any], np.ndarray] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    _scan: VectorScan | None = None

    def scan(self) -> VectorScan:
        if self._scan is None:
            assert self.vectors is not None
            self._scan = VectorScan(self.vectors)
        return self._scan

    def position(self, chunk_id: str) -> int | None:
        if not self.positions and self.ids:
            self.positions = {chunk_id: i for i, chunk_id in enumerate(self.ids)}
        return self.positions.get(chunk_id)

    def mask(self, filters: dict[str, Any]) -> np.ndarray:
        out = np.ones(len(self.ids), dtype=bool)
        for key, value in filters.items():
            cache_key = (key, value if isinstance(value, str | int | float | bool) else repr(value))
            part = self.masks.get(cache_key)
            if part is None:
                part = np.fromiter(
                    (m.get(key) == value for m in self.metadatas), dtype=bool, count=len(self.ids)
                )
                if len(self.masks) > 256:
                    self.masks.clear()
                self.masks[cache_key] = part
            out &= part
        return out


class BM25Index:
    """BM25 indexes for named collections, kept under one folder.

    Example:
        >>> index = BM25Index(Path("/tmp/ragloom/bm25"))
        >>> index.build("docs", ["d1:0"], ["the cat sat"], [{"source": "a.txt"}])
        >>> index.search("docs", "cats", k=5)[0].chunk_id
        'd1:0'

    Args:
        root: Folder holding one sub-folder per collection.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, _Loaded] = {}
        self._versions: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()

    def _dir(self, name: str) -> Path:
        return self.root / validate_collection_name(name)

    # -- collections -------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """Names of the collections that have an index folder."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{_CURRENT}"))

    def has_collection(self, name: str) -> bool:
        """Whether the collection has an index (possibly empty)."""
        return (self._dir(name) / _CURRENT).is_file()

    def create_collection(self, name: str) -> None:
        """Create an empty index (no-op when it exists)."""
        if not self.has_collection(name):
            folder = self._dir(name)
            folder.mkdir(parents=True, exist_ok=True)
            self._write_current(folder, _EMPTY)

    def delete_collection(self, name: str) -> None:
        """Delete the collection's index folder.

        Raises:
            CollectionNotFound: there is no index for it.
        """
        folder = self._dir(name)
        if not folder.exists():
            raise CollectionNotFound(f"collection {name!r} has no BM25 index")
        shutil.rmtree(folder)
        self._cache.pop(name, None)
        self._versions.pop(name, None)

    # -- writing -----------------------------------------------------------------

    @staticmethod
    def _write_current(folder: Path, version: str) -> None:
        tmp = folder / f"{_CURRENT}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(version)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / _CURRENT)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def build(
        self,
        name: str,
        chunk_ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
        *,
        vectors: np.ndarray | None = None,
    ) -> None:
        """Index these chunks as the collection's whole content and swap it in atomically.

        Args:
            name: Collection name.
            chunk_ids: Ids of all the collection's chunks.
            texts: Their texts.
            metadatas: Their metadata.
            vectors: Optional (N, D) embeddings of the same chunks, kept for
                exact dense search (:meth:`dense_search`); rows are normalized.
        """
        import bm25s

        if not (len(chunk_ids) == len(texts) == len(metadatas)):
            raise ValueError("build() needs as many chunk_ids, texts and metadatas")
        if vectors is not None and (vectors.ndim != 2 or len(vectors) != len(chunk_ids)):
            raise ValueError(
                f"build() needs one vector per chunk, got shape {vectors.shape} "
                f"for {len(chunk_ids)} chunks"
            )
        folder = self._dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if not chunk_ids:
            self._write_current(folder, _EMPTY)
            self._remove_old_versions(folder, keep=None)
            return
        version = f"v-{time.time_ns()}"
        tmp = folder / f"{version}.tmp"
        tmp.mkdir()
        try:
            tokens = [bm25_tokenize(t) for t in texts]
            retriever = bm25s.BM25()
            retriever.index(tokens, show_progress=False)
            retriever.save(str(tmp), show_progress=False)
            with open(tmp / _CHUNKS, "w", encoding="utf-8") as fh:
                for chunk_id, text, meta in zip(chunk_ids, texts, metadatas, strict=True):
                    fh.write(json.dumps({"id": chunk_id, "text": text, "metadata": meta}))
                    fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            if vectors is not None:
                with open(tmp / _VECTORS, "wb") as fh:
                    np.save(fh, unit_rows(vectors))
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, folder / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._write_current(folder, version)
        self._remove_old_versions(folder, keep=version)
        logger.info(
            "bm25 index %s: %d chunks in %.2fs", name, len(chunk_ids), time.perf_counter() - started
        )

    @staticmethod
    def _remove_old_versions(folder: Path, keep: str | None) -> None:
        for path in folder.glob("v-*"):
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    # -- reading -----------------------------------------------------------------

    def _current_version(self, name: str) -> str:
        # Every query asks; re-read CURRENT only when its file changed. os.replace
        # gives each version a new inode, so (inode, mtime, size) names it.
        path = self._dir(name) / _CURRENT
        try:
            stat = os.stat(path)
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            known = self._versions.get(name)
            if known is not None and known[0] == key:
                return known[1]
            version = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError as exc:
            raise CollectionNotFound(f"collection {name!r} has no BM25 index") from exc
        self._versions[name] = (key, version)
        return version

    def _load(self, name: str) -> _Loaded:
        version = self._current_version(name)
        cached = self._cache.get(name)
        if cached is not None and cached.version == version:
            return cached
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.version == version:
                return cached
            loaded = self._read(name, version)
            self._cache[name] = loaded
            return loaded

    def _read(self, name: str, version: str) -> _Loaded:
        import bm25s

        if version == _EMPTY:
            return _Loaded(version, None, [], [], [])
        folder = self._dir(name) / version
        try:
            retriever = bm25s.BM25.load(str(folder), show_progress=False)
            ids: list[str] = []
            texts: list[str] = []
            metas: list[dict[str, Any]] = []
            with open(folder / _CHUNKS, encoding="utf-8") as fh:
                for line in fh:
                    row = json.loads(line)
                    ids.append(row["id"])
                    texts.append(row["text"])
                    metas.append(row["metadata"])
            vectors = None
            if (folder / _VECTORS).is_file():
                vectors = np.load(folder / _VECTORS)
                if vectors.shape[0] != len(ids) or vectors.dtype != np.float32:
                    raise ValueError(f"{_VECTORS} has shape {vectors.shape}, {vectors.dtype}")
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"BM25 index of {name!r} at {folder} is unreadable: {exc}") from exc
        return _Loaded(version, retriever, ids, texts, metas, vectors)

    def count(self, name: str) -> int:
        """Number of indexed chunks."""
        return len(self._load(name).ids)

    def has_vectors(self, name: str) -> bool:
        """Whether the collection's current version holds its chunks' embeddings.

        An empty collection counts as having them (there is nothing to miss).
        """
        try:
            loaded = self._load(name)
        except CollectionNotFound:
            return False
        return loaded.vectors is not None or not loaded.ids

    def warm_up(self, name: str) -> None:
        """Load the collection's current version and prepare its vector scan now, so
        the first query does not pay for them."""
        loaded = self._load(name)
        if loaded.vectors is not None and loaded.ids:
            loaded.scan()

    def vectors(self, name: str) -> np.ndarray | None:
        """The current version's (N, D) unit vectors, in ``all_ids`` order, or None."""
        return self._load(name).vectors

    def all_ids(self, name: str) -> list[str]:
        """Every indexed chunk id, in index order."""
        return list(self._load(name).ids)

    def lookup(self, name: str, chunk_ids: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Texts and metadata of indexed chunks: ``{chunk_id: (text, metadata)}``."""
        loaded = self._load(name)
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for chunk_id in chunk_ids:
            i = loaded.position(chunk_id)
            if i is not None:
                out[chunk_id] = (loaded.texts[i], loaded.metadatas[i])
        return out

    def search(
        self, name: str, query: str, k: int, *, filters: dict[str, Any] | None = None
    ) -> list[LexicalHit]:
        """Best-scoring chunks for the query (only chunks sharing a term), best first.

        Args:
            name: Collection name.
            query: Free text.
            k: Maximum number of hits.
            filters: Metadata equality filters (all must hold), applied before ranking.
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        loaded = self._load(name)
        tokens = bm25_tokenize(query)
        if loaded.retriever is None or not tokens:
            return []
        scores = np.asarray(loaded.retriever.get_scores(tokens), dtype=np.float32)  # (N,)
        if filters:
            scores = np.where(loaded.mask(filters), scores, 0.0)
        n_pos = int(np.count_nonzero(scores > 0))
        if n_pos == 0:
            return []
        idx = top_positions(scores, min(k, n_pos))
        return [
            LexicalHit(
                chunk_id=loaded.ids[i],
                score=score,
                text=loaded.texts[i],
                metadata=loaded.metadatas[i],
            )
            for i, score in zip(idx.tolist(), scores[idx].tolist(), strict=True)
        ]

    def dense_search(
        self,
        name: str,
        vector: np.ndarray,
        k: int,
        *,
        filters: dict[str, Any] | None = None,
    ) -> list[DenseHit]:
        """Exact nearest chunks by cosine similarity, best first, with texts and metadata.

        Args:
            name: Collection name.
            vector: Query embedding, shape (D,).
            k: Maximum number of hits.
            filters: Metadata equality filters (all must hold), applied before ranking.

        Raises:
            StoreError: this version holds no vectors (see :meth:`has_vectors`), or
                the query's dimension differs from theirs.
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        loaded = self._load(name)
        if not loaded.ids:
            return []
        if loaded.vectors is None:
            raise StoreError(f"the index of {name!r} holds no vectors")
        query = np.asarray(vector, dtype=np.float32).reshape(-1)  # (D,)
        if query.shape[0] != loaded.vectors.shape[1]:
            raise StoreError(
                f"query vector has dimension {query.shape[0]}, "
                f"collection {name!r} holds {loaded.vectors.shape[1]}"
            )
        norm = float(np.linalg.norm(query))
        if norm > 0:
            query = query / norm
        allowed = loaded.mask(filters) if filters else None
        rows, scores = loaded.scan().top(query, k, allowed)  # (k,), (k,)
        return [
            DenseHit(
                chunk_id=loaded.ids[row],
                score=score,
                text=loaded.texts[row],
                metadata=loaded.metadatas[row],
            )
            for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
        ]
