"""A small real collection for the agents' integration tests.

The Brightwave help-centre samples (``docs/samples/helpcentre``) ingested with
the real loaders, the real MiniLM embedder, real Chroma and BM25 on disk.
Chunks are the markdown sections (one chunk per ``##`` heading), so the test
does not depend on the token chunker's settings.
"""

from __future__ import annotations

import functools
from pathlib import Path

from retrieval import HybridRetriever, Ingestor, SentenceTransformerEmbedder
from retrieval.types import Chunk, SourceDocument

HELPCENTRE = Path(__file__).resolve().parents[2] / "docs" / "samples" / "helpcentre"
COLLECTION = "helpcentre"


class SectionChunker:
    """One chunk per loaded block (a markdown section), keeping its section path."""

    def split(self, doc: SourceDocument, doc_id: str) -> list[Chunk]:
        chunks = []
        for block in doc.blocks:
            if not block.text.strip():
                continue
            index = len(chunks)
            chunks.append(
                Chunk(
                    chunk_id=f"{doc_id}:{index}",
                    doc_id=doc_id,
                    index=index,
                    text=block.text,
                    source=doc.source,
                    title=doc.title,
                    page=block.page,
                    section=block.section,
                    metadata=dict(doc.metadata),
                )
            )
        return chunks


@functools.lru_cache(maxsize=1)
def shared_embedder() -> SentenceTransformerEmbedder:
    """The real MiniLM model, loaded once per test process."""
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    embedder.warm_up()
    return embedder


def build_collection(data_dir: Path) -> None:
    """Ingest the help-centre samples into ``data_dir`` as collection ``helpcentre``."""
    Ingestor(data_dir, embedder=shared_embedder(), chunker=SectionChunker()).ingest(
        [HELPCENTRE], collection=COLLECTION
    )


def open_retriever(data_dir: Path, k: int = 4) -> HybridRetriever:
    """A hybrid retriever over the collection, sharing the loaded embedder."""
    return HybridRetriever.from_data_dir(data_dir, COLLECTION, embedder=shared_embedder(), k=k)
