"""Numbered sources for prompts, and the citations an answer makes to them.

A retrieved LangChain ``Document`` becomes a :class:`Source` numbered from 1;
the prompt lists them as ``[1] title (source, page 3)`` followed by the text;
the answer cites ``[1]``, ``[1, 2]`` or ``[1][2]``; :func:`parse_citation_numbers`
finds those numbers and :func:`resolve_citations` keeps only the ones that name a
source actually given, mapping each to its document.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

SNIPPET_CHARS = 300

# "[1]", "[1, 2]", "[1;2]", "[1-3]", "[ 2 ]": a bracket holding only numbers, separators
# and ranges. "[12a]" or "[see 1]" are not citations.
_CITATION_GROUP = re.compile(r"\[\s*(\d{1,3}(?:\s*(?:[,;]|-|–|and)\s*\d{1,3})*)\s*\]")
_GROUP_PART = re.compile(r"(\d{1,3})\s*(?:(?:-|–)\s*(\d{1,3}))?")
_MAX_RANGE = 20


@dataclass(slots=True, frozen=True)
class Source:
    """One retrieved chunk as shown to the model, numbered from 1.

    Attributes:
        number: The ``[n]`` the model cites it by.
        doc_id: Id of the document the chunk belongs to.
        chunk_id: Id of the chunk.
        source: File path or URL of the document.
        title: Title of the document.
        page: Page of the chunk, if known.
        section: Heading path of the chunk, if known.
        text: The chunk text given to the model.
        score: The retriever's score (the fused score for hybrid retrieval).
        dense_score: Cosine similarity of the dense retriever, when it ran.
        bm25_score: BM25 score, when the lexical retriever ran.
    """

    number: int
    doc_id: str
    chunk_id: str
    source: str
    title: str
    page: int | None
    section: str | None
    text: str
    score: float | None = None
    dense_score: float | None = None
    bm25_score: float | None = None

    @property
    def location(self) -> str:
        """``"source, page 3"`` / ``"source, Install > Linux"`` / ``"source"``."""
        parts = [self.source] if self.source else []
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.section:
            parts.append(self.section)
        return ", ".join(parts)

    @property
    def snippet(self) -> str:
        """The first ``SNIPPET_CHARS`` characters of the text, on one line."""
        return snippet_of(self.text)


@dataclass(slots=True, frozen=True)
class Citation:
    """A citation ``[n]`` in an answer that names a source actually given.

    Attributes:
        number: The number the answer used.
        doc_id: Document id of the cited source.
        chunk_id: Chunk id of the cited source.
        source: File path or URL of the cited document.
        title: Title of the cited document.
        page: Page, if known.
        section: Heading path, if known.
        snippet: The start of the cited chunk's text.
        score: The retriever's score of the cited chunk.
    """

    number: int
    doc_id: str
    chunk_id: str
    source: str
    title: str
    page: int | None
    section: str | None
    snippet: str
    score: float | None

    @classmethod
    def of(cls, source: Source) -> Citation:
        """The citation of ``source``."""
        return cls(
            number=source.number,
            doc_id=source.doc_id,
            chunk_id=source.chunk_id,
            source=source.source,
            title=source.title,
            page=source.page,
            section=source.section,
            snippet=source.snippet,
            score=source.score,
        )


def snippet_of(text: str, limit: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (with an ellipsis when cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _float_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def sources_from_documents(documents: Sequence[Document]) -> list[Source]:
    """Number retrieved documents 1..n in the order given (best first).

    Missing metadata falls back sensibly: ``doc_id`` to the source, ``title`` to
    the source's last path part.
    """
    sources: list[Source] = []
    for number, doc in enumerate(documents, start=1):
        meta = doc.metadata or {}
        source = str(meta.get("source") or "")
        doc_id = str(meta.get("doc_id") or doc.id or source or f"doc-{number}")
        title = str(meta.get("title") or source.rsplit("/", 1)[-1] or doc_id)
        sources.append(
            Source(
                number=number,
                doc_id=doc_id,
                chunk_id=str(meta.get("chunk_id") or doc.id or doc_id),
                source=source,
                title=title,
                page=_int_or_none(meta.get("page")),
                section=str(meta["section"]) if meta.get("section") else None,
                text=doc.page_content,
                score=_float_or_none(meta.get("score")),
                dense_score=_float_or_none(meta.get("dense_score")),
                bm25_score=_float_or_none(meta.get("bm25_score")),
            )
        )
    return sources


def format_source(source: Source, max_chars: int | None = None) -> str:
    """``[n] title (source, page/section)`` then the text on the next line."""
    text = source.text.strip()
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(0, max_chars - 1)].rstrip() + "…"
    header = f"[{source.number}] {source.title}"
    if source.location:
        header += f" ({source.location})"
    return f"{header}\n{text}"


def format_sources(sources: Iterable[Source], max_chars: int | None = None) -> str:
    """All sources, formatted by :func:`format_source`, separated by blank lines."""
    return "\n\n".join(format_source(s, max_chars) for s in sources)


async def aretrieve(retriever: BaseRetriever, query: str, k: int) -> list[Document]:
    """The top ``k`` documents of ``retriever`` for ``query``.

    A retriever with a ``k`` field (ragloom's ``HybridRetriever``, LangChain's
    BM25 retriever, ...) is asked for exactly ``k``; any other retriever is
    asked with its own settings and the result is cut to ``k``. ``k`` is not
    passed as an ``ainvoke`` keyword: a retriever that implements only the sync
    method would refuse it on the async path.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if "k" in type(retriever).model_fields and getattr(retriever, "k", None) != k:
        retriever = retriever.model_copy(update={"k": k})
    documents = await retriever.ainvoke(query)
    return list(documents)[:k]


def retrieve(retriever: BaseRetriever, query: str, k: int) -> list[Document]:
    """The sync form of :func:`aretrieve`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if "k" in type(retriever).model_fields and getattr(retriever, "k", None) != k:
        retriever = retriever.model_copy(update={"k": k})
    return list(retriever.invoke(query))[:k]


def parse_citation_numbers(text: str) -> list[int]:
    """Every number cited in ``text``, in order of first appearance, without repeats.

    Understands ``[1]``, ``[1, 2]``, ``[1;2]``, ``[1][2]``, ``[1 and 2]`` and small
    ranges ``[1-3]`` (at most 20 numbers; a longer range is ignored).

    Example:
        >>> parse_citation_numbers("Yes [2][1], see [1, 3] and [2-4].")
        [2, 1, 3, 4]
    """
    seen: dict[int, None] = {}
    for group in _CITATION_GROUP.finditer(text):
        for part in _GROUP_PART.finditer(group.group(1)):
            start = int(part.group(1))
            end = int(part.group(2)) if part.group(2) else start
            if end < start or end - start >= _MAX_RANGE:
                continue
            for number in range(start, end + 1):
                seen.setdefault(number, None)
    return list(seen)


def resolve_citations(text: str, sources: Sequence[Source]) -> tuple[list[Citation], list[int]]:
    """Citations in ``text`` that name a given source, and the numbers that named none.

    Returns:
        ``(citations, unknown_numbers)``: the kept citations in order of first
        appearance, and the cited numbers that matched no source (dropped).
    """
    by_number = {s.number: s for s in sources}
    citations: list[Citation] = []
    unknown: list[int] = []
    for number in parse_citation_numbers(text):
        if number in by_number:
            citations.append(Citation.of(by_number[number]))
        else:
            unknown.append(number)
    return citations, unknown
