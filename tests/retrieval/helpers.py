"""Shared pieces of the retrieval tests: one embedder per process, small corpora."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from retrieval.embedding import SentenceTransformerEmbedder
from retrieval.hybrid import HybridRetriever
from retrieval.ingest import Chunker, Ingestor, Loader
from retrieval.types import Chunk, SourceDocument, TextBlock

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "docs-samples"


@functools.lru_cache(maxsize=1)
def shared_embedder() -> SentenceTransformerEmbedder:
    """The real MiniLM model, loaded once per test process."""
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2", batch_size=32)
    embedder.warm_up()
    return embedder


def real_loader_available() -> bool:
    try:
        from retrieval.loaders import load_file  # noqa: F401
    except ImportError:
        return False
    return True


def real_chunker_available() -> bool:
    try:
        from retrieval.chunking import TokenChunker  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_text_loader(path: Path) -> list[SourceDocument]:
    """Stand-in for retrieval.loaders until it lands: paragraphs of a UTF-8 text file."""
    text = path.read_text(encoding="utf-8")
    blocks = [TextBlock(p.strip()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return [SourceDocument(str(path.resolve()), path.stem, blocks)]


class _WordChunker:
    """Stand-in for retrieval.chunking.TokenChunker: 120-word windows."""

    def split(self, doc: SourceDocument, doc_id: str) -> list[Chunk]:
        words = doc.text.split()
        pieces = [" ".join(words[i : i + 120]) for i in range(0, max(len(words), 1), 100)]
        return [
            Chunk(f"{doc_id}:{i}", doc_id, i, p, doc.source, doc.title, metadata=dict(doc.metadata))
            for i, p in enumerate(pieces)
            if p
        ]


def make_ingestor(data_dir: Path, **kwargs: Any) -> Ingestor:
    """An Ingestor on the shared embedder with the real loader/chunker when present."""
    loader: Loader | None = None if real_loader_available() else _plain_text_loader
    chunker: Chunker | None = None if real_chunker_available() else _WordChunker()
    kwargs.setdefault("loader", loader)
    kwargs.setdefault("chunker", chunker)
    return Ingestor(data_dir, embedder=shared_embedder(), **kwargs)


def make_retriever(data_dir: Path, collection: str, **kwargs: Any) -> HybridRetriever:
    """A retriever over a data folder, on the shared embedder."""
    return HybridRetriever.from_data_dir(data_dir, collection, embedder=shared_embedder(), **kwargs)


TOPICS = {
    "volcano": "Volcanoes erupt molten lava and ash when magma pressure builds beneath the crust.",
    "baking": "Sourdough bread needs a starter, flour, water and a long slow fermentation.",
    "tides": "Ocean tides rise and fall because of the moon's gravitational pull on the sea.",
    "chess": "In chess the knight moves in an L shape and can jump over other pieces.",
    "bees": "Honey bees communicate the direction of flowers with a waggle dance in the hive.",
    "comet": "A comet grows a glowing tail of gas and dust as it approaches the sun.",
}


def write_corpus(folder: Path, topics: dict[str, str] | None = None) -> dict[str, Path]:
    """One small text file per topic; returns topic -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (topics or TOPICS).items():
        path = folder / f"{name}.txt"
        path.write_text(f"{text}\n\nThis note is about {name}.\n", encoding="utf-8")
        paths[name] = path
    return paths
