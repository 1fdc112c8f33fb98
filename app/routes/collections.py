"""Collections, their documents, uploads (ingestion jobs) and ``POST /api/search``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.deps import CollectionsDep, PrincipalDep, SettingsDep
from app.errors import ApiError
from app.schemas import (
    CollectionCreate,
    CollectionPublic,
    CollectionsPublic,
    DocumentPublic,
    DocumentsPublic,
    FileResultPublic,
    JobPublic,
    SearchHit,
    SearchIn,
    SearchOut,
)
from app.services.collections import CollectionService, Upload, safe_filename
from retrieval import RetrievalError

router = APIRouter(prefix="/api", tags=["collections"])
_COPY_CHUNK = 1024 * 1024


def _public(name: str, service: CollectionService, tenant: str) -> CollectionPublic:
    record = service.record(tenant, name)
    return CollectionPublic(
        name=name,
        documents=record.documents,
        chunks=record.chunks,
        embedding_model=record.embedding_model,
    )


@router.get("/collections")
async def list_collections(who: PrincipalDep, service: CollectionsDep) -> CollectionsPublic:
    """The caller's collections."""
    items = await run_in_threadpool(service.list_collections, who.tenant)
    return CollectionsPublic(
        data=[
            CollectionPublic(
                name=name, documents=r.documents, chunks=r.chunks, embedding_model=r.embedding_model
            )
            for name, r in items
        ]
    )


@router.post("/collections", status_code=201)
async def create_collection(
    body: CollectionCreate, who: PrincipalDep, service: CollectionsDep
) -> CollectionPublic:
    """Create an empty collection (409 if it exists)."""
    await service.create(who.tenant, body.name)
    return await run_in_threadpool(_public, body.name, service, who.tenant)


@router.get("/collections/{name}")
async def get_collection(name: str, who: PrincipalDep, service: CollectionsDep) -> CollectionPublic:
    """One collection with its counts."""
    return await run_in_threadpool(_public, name, service, who.tenant)


@router.delete("/collections/{name}", status_code=204)
async def delete_collection(name: str, who: PrincipalDep, service: CollectionsDep) -> Response:
    """Delete a collection and everything in it."""
    await service.delete(who.tenant, name)
    return Response(status_code=204)


@router.get("/collections/{name}/documents")
async def list_documents(name: str, who: PrincipalDep, service: CollectionsDep) -> DocumentsPublic:
    """The collection's documents."""
    docs = await run_in_threadpool(service.documents, who.tenant, name)
    return DocumentsPublic(
        data=[
            DocumentPublic(doc_id=d.doc_id, source=d.source, title=d.title, chunks=d.n_chunks)
            for d in docs
        ]
    )


@router.delete("/collections/{name}/documents/{doc_id}", status_code=204)
async def delete_document(
    name: str, doc_id: str, who: PrincipalDep, service: CollectionsDep
) -> Response:
    """Remove one document from the collection."""
    await service.delete_document(who.tenant, name, doc_id)
    return Response(status_code=204)


def _store(
    upload: UploadFile, service: CollectionService, tenant: str, name: str, limit: int
) -> Upload:
    filename = safe_filename(upload.filename)
    path = service.new_upload_path(tenant, name, filename)
    size = 0
    with path.open("wb") as out:
        while block := upload.file.read(_COPY_CHUNK):
            size += len(block)
            if size > limit:
                out.close()
                path.unlink(missing_ok=True)
                raise ApiError(
                    413,
                    f"file {filename!r} exceeds the upload limit of {limit} bytes",
                    "file_too_large",
                )
            out.write(block)
    return Upload(filename, path, size)


@router.post("/collections/{name}/documents", status_code=202)
async def upload_documents(
    name: str,
    request: Request,
    who: PrincipalDep,
    service: CollectionsDep,
    settings: SettingsDep,
) -> JobPublic:
    """Upload files (multipart field ``files``, repeatable); ingestion runs as a job."""
    await run_in_threadpool(service.record, who.tenant, name)
    api = settings.api
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "upload files as multipart/form-data (field 'files')", "bad_upload")
    try:
        form = await request.form(max_files=api.max_upload_files, max_fields=20)
    except StarletteHTTPException as exc:
        raise ApiError(413, f"bad multipart body: {exc.detail}", "bad_upload") from exc
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise ApiError(422, "no files: send them in the multipart field 'files'", "no_files")
    limit = int(api.max_upload_mb * 1024 * 1024)
    stored: list[Upload] = []
    try:
        for f in files:
            stored.append(await run_in_threadpool(_store, f, service, who.tenant, name, limit))
    except ApiError:
        for s in stored:
            s.path.unlink(missing_ok=True)
        raise
    finally:
        await form.close()
    job_id = await run_in_threadpool(service.submit_upload, who.tenant, name, stored)
    return await get_job(job_id, who, service)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, who: PrincipalDep, service: CollectionsDep) -> JobPublic:
    """An ingestion job's status, progress and per-file results."""
    job = await run_in_threadpool(service.job, who.tenant, job_id)
    return JobPublic(
        id=job.id,
        collection=job.collection,
        status=job.status,
        total_files=job.total_files,
        processed_files=job.processed_files,
        chunks_added=job.chunks_added,
        files=[FileResultPublic.model_validate(f) for f in job.files or []],
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


@router.post("/search")
async def search(body: SearchIn, who: PrincipalDep, service: CollectionsDep) -> SearchOut:
    """Retrieval only: the top-k chunks with their scores."""

    def run() -> list[Any]:
        retriever = service.retriever(who.tenant, body.collection, body.k, body.mode)
        try:
            return retriever.search(body.query, k=body.k, mode=body.mode, filters=body.filters)
        except ValueError as exc:
            raise ApiError(422, str(exc), "invalid_request") from exc
        except RetrievalError as exc:
            raise ApiError(400, f"search failed: {exc}", "search_failed") from exc

    results = await run_in_threadpool(run)
    prefix = f"t_{who.tenant}__"
    return SearchOut(
        results=[
            SearchHit(
                rank=c.rank,
                score=c.score,
                dense_score=c.dense_score,
                bm25_score=c.bm25_score,
                chunk_id=c.chunk_id,
                doc_id=c.doc_id,
                text=c.text,
                metadata={k: v for k, v in c.metadata.items() if not str(v).startswith(prefix)},
            )
            for c in results
        ]
    )
