"""Plain data types that flow through ingestion: loaded documents and chunks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


class RetrievalError(Exception):
    """Base class of every error raised by the retrieval package."""


class LoaderError(RetrievalError):
    """A file could not be loaded; the message names the file and the reason."""


@dataclass(slots=True)
class TextBlock:
    """A run of text from one place in a document.

    Attributes:
        text: Normalised text (no markup).
        page: 1-based page number for paginated formats (PDF), else None.
        section: Heading path such as ``"Install > On Linux"``, else None.
    """

    text: str
    page: int | None = None
    section: str | None = None


@dataclass(slots=True)
class SourceDocument:
    """One logical document produced by a loader (a file, or a CSV/JSONL row).

    Attributes:
        source: Where it came from: a resolved file path (plus ``#row=N`` for rows) or a URL.
        title: Human title (HTML <title>, first heading, PDF metadata, or the file name).
        blocks: The text in reading order, each with its page/section.
        metadata: Extra caller- or loader-provided fields (strings, numbers, bools only).
    """

    source: str
    title: str
    blocks: list[TextBlock]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """All blocks joined with blank lines."""
        return "\n\n".join(b.text for b in self.blocks if b.text)

    @property
    def content_hash(self) -> str:
        """sha256 of the title and the text (hex, first 32 chars)."""
        h = hashlib.sha256()
        h.update(self.title.encode("utf-8", "surrogatepass"))
        for b in self.blocks:
            h.update(b"\x00")
            h.update(f"{b.page}|{b.section}|".encode())
            h.update(b.text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:32]


@dataclass(slots=True)
class Chunk:
    """A piece of a document sized for the embedding model.

    Attributes:
        chunk_id: Stable id, ``f"{doc_id}:{index}"``.
        doc_id: Id of the document (derived from its source).
        index: Position of the chunk in its document.
        text: The chunk text (what gets embedded and indexed).
        source: As in SourceDocument.
        title: As in SourceDocument.
        page: Page of the chunk's first character, if known.
        section: Heading path of the chunk, if known.
        metadata: Document metadata copied onto the chunk.
    """

    chunk_id: str
    doc_id: str
    index: int
    text: str
    source: str
    title: str
    page: int | None = None
    section: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
