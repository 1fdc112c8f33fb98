"""Tenant-namespaced collections, documents and ingestion jobs.

A tenant's collection ``docs`` is stored as ``t_<tenant>__docs``; that
physical name never leaves this module. Every write (create, delete, ingest,
delete a document) runs on one writer thread, in order, so the API process is
the only writer of its data folder while it runs (the ingestion pipeline's
file lock refuses any other process).

Example:
    >>> service = CollectionService(settings, embedder, db, metrics)
    >>> await service.create("acme", "docs")
    >>> job = service.submit_upload("acme", "docs", [("faq.md", b"# FAQ ...")])
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.db import Database, IngestionJob, new_id
from app.errors import ApiError, not_found
from app.metrics import ApiMetrics
from app.settings import Settings
from retrieval import (
    BM25Index,
    ChromaStore,
    CollectionNotFound,
    Embedder,
    HybridRetriever,
    Ingestor,
    InvalidCollectionName,
    Manifest,
    RetrievalError,
    SourceDocument,
    WriterLock,
    WriterLocked,
)
from retrieval.manifest import CollectionRecord, DocumentRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,38}[A-Za-z0-9]$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._ -]+")
UPLOAD_SOURCE = "upload:"


def physical_name(tenant: str, name: str) -> str:
    """The store name of a tenant's collection.

    Raises:
        ApiError: 422 when ``name`` is not a valid collection name.
    """
    if not _NAME_RE.match(name) or ".." in name:
        raise ApiError(
            422,
            f"invalid collection name {name!r}: use 3-40 characters from A-Z a-z 0-9 . _ -, "
            "starting and ending with a letter or digit, without '..'",
            "invalid_collection_name",
            param="collection",
        )
    return f"t_{tenant}__{name}"


def safe_filename(name: str | None) -> str:
    """A display name for an uploaded file: no folders, NULs or control characters.

    The name is only shown and used as the document's source; files are stored
    under a server-generated name.
    """
    base = (name or "").replace("\\", "/").split("/")[-1]
    base = _UNSAFE_CHARS.sub("_", base).strip(" .")
    return base[:100] or "upload"


@dataclass(slots=True)
class Upload:
    """An uploaded file already written to a server-named temporary path."""

    filename: str
    path: Path
    size: int


class CollectionService:
    """Collections, documents and ingestion jobs of every tenant.

    Args:
        settings: The settings (data folder, chunking, loader limits).
        embedder: Shared by ingestion and retrieval (loaded once).
        db: Where ingestion jobs are recorded.
        metrics: Job counters.
    """

    def __init__(
        self, settings: Settings, embedder: Embedder, db: Database, metrics: ApiMetrics
    ) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir
        self.embedder = embedder
        self.db = db
        self.metrics = metrics
        self.chroma = ChromaStore(self.data_dir, url=settings.retrieval.chroma_url)
        self.bm25 = BM25Index(self.data_dir / "bm25")
        self.uploads_dir = self.data_dir / "uploads"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragloom-writer")
        self._ingestor: Ingestor | None = None
        self._manifest: Manifest | None = None
        self._manifest_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued writes, then release the stores."""
        self._writer.shutdown(wait=True, cancel_futures=False)
        if self._ingestor is not None:
            self._ingestor.close()
        if self._manifest is not None:
            self._manifest.close()

    def _ingestor_on_writer(self) -> Ingestor:
        if self._ingestor is None:
            from retrieval.ingest import default_loader
            from retrieval.loaders import LoaderLimits

            r = self.settings.retrieval
            limits = LoaderLimits(
                max_file_bytes=int(r.max_file_mb * 1024 * 1024), parse_timeout_s=r.parse_timeout_s
            )
            ingestor = Ingestor(
                self.data_dir,
                embedder=self.embedder,
                loader=default_loader(limits=limits),
                chroma_url=r.chroma_url,
                batch_chunks=r.ingest_batch_chunks,
                chunk_size=r.chunk_size,
                chunk_overlap=r.chunk_overlap,
                exact_search_max_chunks=r.exact_search_max_chunks,
            )
            ingestor.chroma, ingestor.bm25 = self.chroma, self.bm25  # one cache of each
            self._ingestor = ingestor
        return self._ingestor

    def _read(self, fn: Callable[[Manifest], T]) -> T:
        with self._manifest_lock:
            if self._manifest is None:
                self._manifest = Manifest(self.data_dir / "manifest.sqlite")
            return fn(self._manifest)

    async def _write(self, fn: Callable[[], T]) -> T:
        future: Future[T] = self._writer.submit(fn)
        try:
            return await asyncio.wrap_future(future)
        except WriterLocked as exc:
            raise ApiError(409, f"the data folder is busy: {exc}", "writer_locked") from exc
        except InvalidCollectionName as exc:
            raise ApiError(422, str(exc), "invalid_collection_name") from exc
        except RetrievalError as exc:
            logger.warning("store write failed: %s", exc)
            raise ApiError(503, f"the document store failed: {exc}", "store_error") from exc

    # -- collections ---------------------------------------------------------------

    def record(self, tenant: str, name: str) -> CollectionRecord:
        """The collection's record.

        Raises:
            ApiError: 404 when the tenant has no such collection.
        """
        physical = physical_name(tenant, name)
        record = self._read(lambda m: m.collection(physical))
        if record is None:
            raise not_found("collection", name)
        return record

    def list_collections(self, tenant: str) -> list[tuple[str, CollectionRecord]]:
        """The tenant's collections as ``(public name, record)``."""
        prefix = f"t_{tenant}__"
        records = self._read(lambda m: m.collections())
        return [(r.name[len(prefix) :], r) for r in records if r.name.startswith(prefix)]

    async def create(self, tenant: str, name: str) -> CollectionRecord:
        """Create an empty collection.

        Raises:
            ApiError: 409 when it exists, 422 for a bad name.
        """
        physical = physical_name(tenant, name)

        def run() -> None:
            ingestor = self._ingestor_on_writer()
            if ingestor.manifest.collection(physical) is not None:
                raise ApiError(409, f"collection {name!r} already exists", "collection_exists")
            ingestor.create_collection(physical)

        await self._write(run)
        return self.record(tenant, name)

    async def delete(self, tenant: str, name: str) -> None:
        """Delete a collection, its documents and its uploads.

        Raises:
            ApiError: 404 when the tenant has no such collection.
        """
        self.record(tenant, name)
        physical = physical_name(tenant, name)

        def run() -> None:
            try:
                self._ingestor_on_writer().delete_collection(physical)
            except CollectionNotFound as exc:
                raise not_found("collection", name) from exc
            shutil.rmtree(self.uploads_dir / physical, ignore_errors=True)

        await self._write(run)

    # -- documents -----------------------------------------------------------------

    def documents(self, tenant: str, name: str) -> list[DocumentRecord]:
        """The collection's committed documents, by source."""
        self.record(tenant, name)
        physical = physical_name(tenant, name)
        docs = self._read(lambda m: m.documents(physical))
        return sorted(docs.values(), key=lambda d: (d.source, d.doc_id))

    async def delete_document(self, tenant: str, name: str, doc_id: str) -> None:
        """Remove one document from both stores.

        Raises:
            ApiError: 404 when the collection or the document does not exist.
        """
        self.record(tenant, name)
        physical = physical_name(tenant, name)

        def run() -> None:
            ingestor = self._ingestor_on_writer()
            with WriterLock(self.data_dir):
                if doc_id not in ingestor.manifest.documents(physical):
                    raise not_found("document", doc_id)
                garbage = ingestor.manifest.remove_documents(physical, [doc_id])
                ingestor.chroma.delete(physical, garbage)
                ingestor.manifest.clear_garbage(physical, garbage)
                ingestor.rebuild_bm25(physical)

        await self._write(run)

    # -- retrieval -----------------------------------------------------------------

    def retriever(
        self, tenant: str, name: str, k: int, mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    ) -> HybridRetriever:
        """A retriever over the tenant's collection (shared model and stores).

        Raises:
            ApiError: 404 when the tenant has no such collection.
        """
        self.record(tenant, name)
        r = self.settings.retrieval
        return HybridRetriever(
            collection=physical_name(tenant, name),
            chroma=self.chroma,
            bm25=self.bm25,
            embedder=self.embedder,
            k=k,
            mode=mode,
            fetch_k=r.fetch_k,
            rrf_k=r.rrf_k,
            dense_weight=r.dense_weight,
            bm25_weight=r.bm25_weight,
        )

    def ping(self) -> str | None:
        """None when the stores answer, else what is wrong; never raises."""
        try:
            self.chroma.client.heartbeat()
            self._read(lambda m: m.collections())
        except Exception as exc:  # any client failure means "not ready"
            return f"vector store unreachable: {exc}"
        return None

    # -- ingestion jobs ------------------------------------------------------------

    def new_upload_path(self, tenant: str, name: str, filename: str) -> Path:
        """A server-generated path for an uploaded file (its suffix kept for the loader)."""
        suffix = Path(filename).suffix.lower()[:10]
        if not re.fullmatch(r"\.[a-z0-9]{1,9}", suffix):
            suffix = ""
        folder = self.uploads_dir / physical_name(tenant, name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}{suffix}"

    def submit_upload(self, tenant: str, name: str, uploads: list[Upload]) -> str:
        """Queue an ingestion job over already-stored uploads; returns the job id."""
        self.record(tenant, name)
        job_id = new_id("job")
        with self.db.session() as s:
            s.add(
                IngestionJob(
                    id=job_id,
                    tenant=tenant,
                    collection=name,
                    status="queued",
                    total_files=len(uploads),
                    files=[],
                )
            )
        self._writer.submit(self._run_job, job_id, tenant, name, uploads)
        return job_id

    def job(self, tenant: str, job_id: str) -> IngestionJob:
        """A job of this tenant.

        Raises:
            ApiError: 404 for an unknown job or another tenant's.
        """
        with self.db.session() as s:
            job = s.get(IngestionJob, job_id)
            if job is None or job.tenant != tenant:
                raise not_found("job", job_id)
            return job

    def _update_job(self, job_id: str, **fields: Any) -> None:
        with self.db.session() as s:
            job = s.get(IngestionJob, job_id)
            if job is not None:
                for key, value in fields.items():
                    setattr(job, key, value)

    def _run_job(self, job_id: str, tenant: str, name: str, uploads: list[Upload]) -> None:
        physical = physical_name(tenant, name)
        self._update_job(job_id, status="running")
        results: list[dict[str, Any]] = []
        documents: list[SourceDocument] = []
        by_source: dict[str, int] = {}
        try:
            ingestor = self._ingestor_on_writer()
            for number, upload in enumerate(uploads):
                result: dict[str, Any] = {"filename": upload.filename, "status": "loaded"}
                try:
                    docs = ingestor.loader(upload.path)
                except (RetrievalError, OSError) as exc:
                    message = str(exc).replace(str(upload.path), upload.filename)
                    result.update(status="failed", error=message)
                    docs = []
                source = f"{UPLOAD_SOURCE}{upload.filename}"
                for doc in docs:
                    _rename(doc, upload, source)
                    by_source[doc.source] = number
                documents.extend(docs)
                result["documents"] = len(docs)
                results.append(result)
                self._update_job(job_id, processed_files=number + 1, files=list(results))
            report = ingestor.ingest_documents(documents, physical)
            for entry in report.files:
                result = results[by_source[entry.path]]
                result["chunks"] = result.get("chunks", 0) + entry.chunks
                if entry.status == "failed":
                    result.update(status="failed", error=entry.reason)
                elif result["status"] != "failed":
                    result["status"] = _merge_status(result["status"], entry.status)
            status = "succeeded"
            error = None
            chunks_added = report.chunks_added
        except RetrievalError as exc:
            logger.warning("ingestion job %s failed: %s", job_id, exc)
            status, error, chunks_added = "failed", str(exc), 0
        except Exception as exc:  # a job must end with a status, whatever broke
            logger.exception("ingestion job %s crashed", job_id)
            status, error, chunks_added = "failed", f"internal error: {type(exc).__name__}", 0
        finally:
            for upload in uploads:
                upload.path.unlink(missing_ok=True)
        self.metrics.jobs.labels(status).inc()
        self._update_job(
            job_id,
            status=status,
            error=error,
            chunks_added=chunks_added,
            files=results,
            finished_at=time.time(),
        )


def _rename(doc: SourceDocument, upload: Upload, source: str) -> None:
    """Replace the server-side path in a loaded document by the upload's name."""
    path = str(upload.path.resolve())
    doc.source = doc.source.replace(path, source, 1) if doc.source.startswith(path) else source
    if upload.path.stem in doc.title or not doc.title.strip():
        doc.title = upload.filename


def _merge_status(current: str, new: str) -> str:
    order = ["loaded", "unchanged", "added", "updated"]
    return new if order.index(new) > order.index(current) else current
