"""CLI commands: ``ingest``, ``query`` and ``collections list|create|delete``.

Everything lives under ``RAGLOOM_DATA_DIR`` (Settings.data_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from app.cli._common import fail, load_settings

if TYPE_CHECKING:
    from app.settings import Settings
    from retrieval.ingest import Ingestor

collections_app = typer.Typer(
    name="collections", help="List, create and delete collections.", no_args_is_help=True
)


def _settings() -> Settings:
    return load_settings()  # fresh: tests and scripts change RAGLOOM_* between calls


def _split_columns(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        fail(f"empty column list {value!r}; give comma-separated column names")
    return names


def _ingestor(settings: Settings, *, chunk_size: int, chunk_overlap: int, loader: Any) -> Ingestor:
    from retrieval.embedding import SentenceTransformerEmbedder
    from retrieval.ingest import Ingestor

    def progress(docs: int, chunks: int) -> None:
        typer.echo(f"progress: {docs} documents committed, {chunks} chunks", err=True)

    return Ingestor(
        settings.data_dir,
        embedder=SentenceTransformerEmbedder(
            settings.retrieval.embedding_model,
            query_dtype=settings.retrieval.query_dtype,
            query_backend=settings.retrieval.query_backend,
        ),
        loader=loader,
        chroma_url=settings.retrieval.chroma_url,
        batch_chunks=settings.retrieval.ingest_batch_chunks,
        chunk_size=chunk_size,
        chunk_overlap=chunk_overlap,
        progress=progress,
        exact_search_max_chunks=settings.retrieval.exact_search_max_chunks,
    )


def ingest(
    paths: list[Path] = typer.Argument(..., help="Files or folders to ingest."),
    collection: str = typer.Option(..., "--collection", "-c", help="Target collection."),
    prune: bool = typer.Option(False, "--prune", help="Remove documents whose file is gone."),
    chunk_size: int | None = typer.Option(None, "--chunk-size", help="Tokens per chunk."),
    chunk_overlap: int | None = typer.Option(None, "--chunk-overlap", help="Overlap tokens."),
    text_columns: str | None = typer.Option(None, help="CSV/JSONL text columns, a,b,c."),
    title_column: str | None = typer.Option(None, help="CSV/JSONL title column."),
    id_column: str | None = typer.Option(None, help="CSV/JSONL stable id column."),
    metadata_columns: str | None = typer.Option(None, help="CSV/JSONL metadata columns, a,b."),
) -> None:
    """Ingest files into a collection (created when missing); unchanged files are skipped."""
    from retrieval.ingest import default_loader
    from retrieval.loaders import LoaderLimits, TableOptions
    from retrieval.types import RetrievalError

    settings = _settings()
    size = settings.retrieval.chunk_size if chunk_size is None else chunk_size
    overlap = settings.retrieval.chunk_overlap if chunk_overlap is None else chunk_overlap
    if size <= 0:
        fail(f"--chunk-size must be > 0, got {size}")
    if overlap < 0 or overlap >= size:
        fail(f"--chunk-overlap must be >= 0 and < chunk size {size}, got {overlap}")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    table = TableOptions(
        text_columns=_split_columns(text_columns),
        title_column=title_column,
        id_column=id_column,
        metadata_columns=_split_columns(metadata_columns),
    )
    limits = LoaderLimits(
        max_file_bytes=int(settings.retrieval.max_file_mb * 1024 * 1024),
        parse_timeout_s=settings.retrieval.parse_timeout_s,
    )
    try:
        ingestor = _ingestor(
            settings,
            chunk_size=size,
            chunk_overlap=overlap,
            loader=default_loader(limits=limits, table=table),
        )
        report = ingestor.ingest(paths, collection, prune=prune)
    except (RetrievalError, ValueError) as exc:
        fail(str(exc))
    for entry in report.files:
        line = f"{entry.status:<9} {entry.path}"
        if entry.status == "failed":
            line += f": {entry.reason}"
        elif entry.chunks:
            line += f" ({entry.chunks} chunks)"
        typer.echo(line)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


def _parse_filters(items: list[str]) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"bad --filter {item!r}: use key=value, e.g. --filter page=3")
        value: Any = raw
        if raw.lstrip("-").isdigit():
            value = int(raw)  # page=3 matches the integer page
        elif raw in ("true", "false"):
            value = raw == "true"
        filters[key] = value
    return filters


def query(
    text: str = typer.Argument(..., help="The question or search text."),
    collection: str = typer.Option(..., "--collection", "-c", help="Collection to search."),
    k: int = typer.Option(5, "-k", "--k", help="Results to return."),
    mode: str = typer.Option("hybrid", "--mode", "-m", help="bm25 | dense | hybrid"),
    filter_: list[str] = typer.Option(
        [], "--filter", "-f", help="Metadata equality filter key=value (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Search a collection and print the top-k chunks with their scores."""
    from retrieval.hybrid import MODES, HybridRetriever
    from retrieval.types import RetrievalError

    if k <= 0:
        fail(f"-k must be > 0, got {k}")
    if mode not in MODES:
        fail(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not text.strip():
        fail("the query text is empty")
    filters = _parse_filters(filter_)
    settings = _settings()
    r = settings.retrieval
    try:
        if not (settings.data_dir / "manifest.sqlite").exists() and r.chroma_url is None:
            fail(f"collection {collection!r} does not exist (no data in {settings.data_dir})")
        retriever = HybridRetriever.from_data_dir(
            settings.data_dir,
            collection,
            chroma_url=r.chroma_url,
            fetch_k=r.fetch_k,
            rrf_k=r.rrf_k,
            dense_weight=r.dense_weight,
            bm25_weight=r.bm25_weight,
        )
        results = retriever.search(text, k=k, mode=mode, filters=filters or None)
    except (RetrievalError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        rows = [
            {
                "rank": c.rank,
                "score": c.score,
                "dense_score": c.dense_score,
                "bm25_score": c.bm25_score,
                "chunk_id": c.chunk_id,
                "doc_id": c.doc_id,
                "text": c.text,
                "metadata": c.metadata,
            }
            for c in results
        ]
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not results:
        typer.echo("no results")
    for c in results:
        where = c.metadata.get("source", "?")
        if c.metadata.get("page") is not None:
            where += f" p.{c.metadata['page']}"
        if c.metadata.get("section"):
            where += f" [{c.metadata['section']}]"
        excerpt = " ".join(c.text.split())[:200]
        typer.echo(f"{c.rank}. {c.score:.4f} {where}\n   {excerpt}")


@collections_app.command("list")
def list_collections() -> None:
    """List collections with their document and chunk counts."""
    from retrieval.manifest import Manifest
    from retrieval.types import RetrievalError

    settings = _settings()
    path = settings.data_dir / "manifest.sqlite"
    if not path.exists():
        typer.echo("no collections")
        return
    try:
        manifest = Manifest(path)
        records = manifest.collections()
        manifest.close()
    except RetrievalError as exc:
        fail(str(exc))
    if not records:
        typer.echo("no collections")
    for rec in records:
        typer.echo(
            f"{rec.name}\t{rec.documents} documents\t{rec.chunks} chunks\t{rec.embedding_model}"
        )


@collections_app.command("create")
def create_collection(name: str = typer.Argument(..., help="Collection name.")) -> None:
    """Create an empty collection."""
    from retrieval.ingest import default_loader
    from retrieval.types import RetrievalError

    settings = _settings()
    r = settings.retrieval
    try:
        ingestor = _ingestor(
            settings,
            chunk_size=r.chunk_size,
            chunk_overlap=r.chunk_overlap,
            loader=default_loader(),
        )
        if ingestor.manifest.collection(name) is not None:
            fail(f"collection {name!r} already exists")
        ingestor.create_collection(name)
    except RetrievalError as exc:
        fail(str(exc))
    typer.echo(f"created {name}")


@collections_app.command("delete")
def delete_collection(name: str = typer.Argument(..., help="Collection name.")) -> None:
    """Delete a collection and all its data."""
    from retrieval.ingest import default_loader
    from retrieval.types import RetrievalError

    settings = _settings()
    r = settings.retrieval
    try:
        ingestor = _ingestor(
            settings,
            chunk_size=r.chunk_size,
            chunk_overlap=r.chunk_overlap,
            loader=default_loader(),
        )
        ingestor.delete_collection(name)
    except RetrievalError as exc:
        fail(str(exc))
    typer.echo(f"deleted {name}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    app.command("ingest")(ingest)
    app.command("query")(query)
    app.add_typer(collections_app, name="collections")
