"""The vector store (Chroma) and the errors and name rules shared by both stores.

Chroma runs embedded (``PersistentClient`` in ``data_dir/"chroma"``) unless a
server URL is given (``HttpClient``). Collections use the cosine space and hold
the embeddings we compute ourselves: no Chroma embedding function is attached
(its default would try to download an ONNX model).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from retrieval.types import RetrievalError

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


class StoreError(RetrievalError):
    """A store operation failed (the message says which store and why)."""


class InvalidCollectionName(StoreError):
    """A collection name breaks the naming rules."""


class CollectionNotFound(StoreError):
    """The named collection does not exist."""


def validate_collection_name(name: str) -> str:
    """Check a collection name and return it.

    Rules (safe as a Chroma name and as a folder name): 3 to 63 characters from
    ``[A-Za-z0-9._-]``, starting and ending with a letter or digit, no ``..``.

    Raises:
        InvalidCollectionName: naming the rule the name breaks.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidCollectionName(
            f"invalid collection name {name!r}: use 3-63 characters from A-Z a-z 0-9 . _ -, "
            "starting and ending with a letter or digit, without '..'"
        )
    return name


@dataclass(slots=True)
class DenseHit:
    """One nearest-neighbour result from the vector store.

    Attributes:
        chunk_id: Id of the chunk.
        score: Cosine similarity (1 - cosine distance).
        text: The chunk text, when asked for.
        metadata: The chunk metadata, when asked for.
    """

    chunk_id: str
    score: float
    text: str | None = None
    metadata: dict[str, Any] | None = None


def where_clause(filters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Turn an equality filter dict into a Chroma ``where`` clause."""
    if not filters:
        return None
    terms = [{key: {"$eq": value}} for key, value in sorted(filters.items())]
    return terms[0] if len(terms) == 1 else {"$and": terms}


def clean_metadata(metadata: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Keep the scalar, non-None values Chroma accepts (others become strings)."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if isinstance(value, str | bool | int | float):
            out[key] = value
        else:
            out[key] = str(value)
    return out


class ChromaStore:
    """Named Chroma collections holding chunk embeddings, texts and metadata.

    Example:
        >>> store = ChromaStore(data_dir=Path("/tmp/ragloom"))
        >>> store.create_collection("docs", metadata={"embedding_model": "all-MiniLM-L6-v2"})
        >>> store.add("docs", ["d1:0"], vectors, ["text"], [{"source": "a.txt"}])
        >>> hits = store.query("docs", query_vector, k=5)

    Args:
        data_dir: Folder for the embedded database (``data_dir/"chroma"``).
        url: ``http(s)://host:port`` of a Chroma server; when set, ``data_dir`` is unused.
    """

    def __init__(self, data_dir: Path | None = None, *, url: str | None = None) -> None:
        if data_dir is None and url is None:
            raise ValueError("ChromaStore needs data_dir or url")
        if url is not None:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"chroma url must be http(s)://host[:port], got {url!r}")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.url = url
        self._client: ClientAPI | None = None
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> ClientAPI:
        """The Chroma client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _connect(self) -> ClientAPI:
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        settings = ChromaSettings(anonymized_telemetry=False)
        if self.url is not None:
            parsed = urlparse(self.url)
            port = parsed.port or (443 if parsed.scheme == "https" else 8000)
            try:
                return chromadb.HttpClient(
                    host=parsed.hostname or "localhost",
                    port=port,
                    ssl=parsed.scheme == "https",
                    settings=settings,
                )
            except Exception as exc:  # connection errors come in several types
                raise StoreError(f"cannot reach the Chroma server at {self.url}: {exc}") from exc
        assert self.data_dir is not None
        path = self.data_dir / "chroma"
        path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(path), settings=settings)

    # -- collections -------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """Names of all collections, sorted."""
        return sorted(c.name for c in self.client.list_collections())

    def has_collection(self, name: str) -> bool:
        """Whether the collection exists."""
        return name in self.list_collections()

    def create_collection(self, name: str, *, metadata: dict[str, Any] | None = None) -> None:
        """Create a cosine-space collection (no-op when it exists)."""
        validate_collection_name(name)
        collection = self.client.get_or_create_collection(
            name,
            configuration={"hnsw": {"space": "cosine"}},
            metadata=metadata or None,
            embedding_function=None,
        )
        self._collections[name] = collection

    def delete_collection(self, name: str) -> None:
        """Delete a collection and its data.

        Raises:
            CollectionNotFound: no collection of that name.
        """
        from chromadb.errors import NotFoundError

        self._collections.pop(name, None)
        try:
            self.client.delete_collection(name)
        except (NotFoundError, ValueError) as exc:
            raise CollectionNotFound(f"collection {name!r} does not exist") from exc

    def collection(self, name: str) -> Collection:
        """The Chroma collection object (cached).

        Raises:
            CollectionNotFound: no collection of that name.
        """
        found = self._collections.get(name)
        if found is not None:
            return found
        from chromadb.errors import NotFoundError

        validate_collection_name(name)
        try:
            found = self.client.get_collection(name, embedding_function=None)
        except (NotFoundError, ValueError) as exc:
            raise CollectionNotFound(f"collection {name!r} does not exist") from exc
        self._collections[name] = found
        return found

    def collection_metadata(self, name: str) -> dict[str, Any]:
        """The metadata the collection was created with."""
        return dict(self.collection(name).metadata or {})

    # -- records -----------------------------------------------------------------

    def count(self, name: str) -> int:
        """Number of chunks in the collection."""
        return int(self.collection(name).count())

    def all_ids(self, name: str) -> set[str]:
        """Every chunk id in the collection."""
        return set(self.collection(name).get(include=[])["ids"])

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` already stored."""
        if not ids:
            return set()
        found: set[str] = set()
        step = self._max_batch()
        for start in range(0, len(ids), step):
            part = list(ids[start : start + step])
            found.update(self.collection(name).get(ids=part, include=[])["ids"])
        return found

    def _max_batch(self) -> int:
        try:
            return max(1, int(self.client.get_max_batch_size()))
        except Exception:  # older servers do not report it
            return 1000

    def add(
        self,
        name: str,
        ids: Sequence[str],
        embeddings: np.ndarray,
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
    ) -> int:
        """Add records whose ids are not stored yet; returns how many were added.

        Ids already present are skipped, never re-upserted: on chromadb 1.5.9
        re-upserting existing ids degrades HNSW recall.
        """
        if not (len(ids) == len(embeddings) == len(texts) == len(metadatas)):
            raise ValueError(
                f"add() needs equal lengths, got ids={len(ids)} embeddings={len(embeddings)} "
                f"texts={len(texts)} metadatas={len(metadatas)}"
            )
        if len(ids) == 0:
            return 0
        present = self.existing_ids(name, ids)
        keep = [i for i, chunk_id in enumerate(ids) if chunk_id not in present]
        if not keep:
            return 0
        collection = self.collection(name)
        step = self._max_batch()
        for start in range(0, len(keep), step):
            part = keep[start : start + step]
            collection.add(
                ids=[ids[i] for i in part],
                embeddings=np.asarray(embeddings[part], dtype=np.float32),
                documents=[texts[i] for i in part],
                metadatas=[clean_metadata(metadatas[i]) or None for i in part],  # type: ignore[misc]
            )
        return len(keep)

    def delete(self, name: str, ids: Sequence[str]) -> None:
        """Delete records by id (ids that are absent are ignored)."""
        if not ids:
            return
        collection = self.collection(name)
        step = self._max_batch()
        for start in range(0, len(ids), step):
            collection.delete(ids=list(ids[start : start + step]))

    def get(self, name: str, ids: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Texts and metadata of the given ids: ``{chunk_id: (text, metadata)}``."""
        if not ids:
            return {}
        got = self.collection(name).get(ids=list(ids), include=["documents", "metadatas"])
        documents = got["documents"] or []
        metadatas = got["metadatas"] or []
        return {
            chunk_id: (documents[i] or "", dict(metadatas[i] or {}))
            for i, chunk_id in enumerate(got["ids"])
        }

    def embeddings(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of ``ids``, in that order: shape (len(ids), D), float32.

        Raises:
            StoreError: some ids are not stored.
        """
        rows: dict[str, np.ndarray] = {}
        step = self._max_batch()
        for start in range(0, len(ids), step):
            got = self.collection(name).get(
                ids=list(ids[start : start + step]), include=["embeddings"]
            )
            vectors = got["embeddings"]
            if vectors is None:
                vectors = []
            for chunk_id, vector in zip(got["ids"], vectors, strict=True):
                rows[chunk_id] = np.asarray(vector, dtype=np.float32)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise StoreError(
                f"{len(missing)} chunks of {name!r} have no stored vector, e.g. {missing[0]!r}"
            )
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([rows[i] for i in ids])

    def query(
        self,
        name: str,
        embedding: np.ndarray,
        k: int,
        *,
        filters: dict[str, Any] | None = None,
        include_payload: bool = False,
    ) -> list[DenseHit]:
        """Nearest chunks to one query vector, best first.

        Args:
            name: Collection name.
            embedding: Query vector, shape (D,).
            k: Number of results wanted.
            filters: Metadata equality filters (all must hold).
            include_payload: Also return texts and metadata.
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        include: list[str] = ["distances"]
        if include_payload:
            include += ["documents", "metadatas"]
        result = self.collection(name).query(
            query_embeddings=np.asarray(embedding, dtype=np.float32).reshape(1, -1),
            n_results=k,
            where=where_clause(filters),
            include=include,  # type: ignore[arg-type]
        )
        ids = result["ids"][0]
        distances = (result.get("distances") or [[]])[0]
        none: list[Any] = [None] * len(ids)
        docs: list[Any] = (result.get("documents") or [none])[0]
        metas: list[Any] = (result.get("metadatas") or [none])[0]
        return [
            DenseHit(
                chunk_id=chunk_id,
                score=1.0 - float(distances[i]),
                text=docs[i],
                metadata=dict(metas[i]) if metas[i] is not None else None,
            )
            for i, chunk_id in enumerate(ids)
        ]
