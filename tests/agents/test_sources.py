"""Citation parsing and validation against the sources given."""

from __future__ import annotations

from langchain_core.documents import Document

from agents.sources import (
    format_source,
    parse_citation_numbers,
    resolve_citations,
    sources_from_documents,
)


def test_parse_single_grouped_adjacent_and_ranges() -> None:
    assert parse_citation_numbers("A [1]. B [2, 3]. C [4][5]. D [6; 7] E [8-10]") == list(
        range(1, 11)
    )


def test_parse_keeps_first_appearance_order_without_repeats() -> None:
    assert parse_citation_numbers("x [3] y [1] z [3][1] w [2 and 3]") == [3, 1, 2]


def test_parse_ignores_non_citations() -> None:
    text = "an array a[i], a list [a, b], [see 1], [12a], [], a huge range [1-500]"
    assert parse_citation_numbers(text) == []


def test_resolve_drops_unknown_numbers_and_maps_the_rest(three_docs: list[Document]) -> None:
    sources = sources_from_documents(three_docs)
    citations, unknown = resolve_citations("Paid in 5 days [1][7]; Pro [2, 9].", sources)
    assert [c.number for c in citations] == [1, 2]
    assert unknown == [7, 9]
    first, second = citations
    assert (first.doc_id, first.source, first.title, first.page) == (
        "doc1",
        "/data/doc1.md",
        "Doc 1",
        2,
    )
    assert second.section == "Pricing > Pro"
    assert second.snippet.startswith("The Pro plan costs")
    assert second.score == sources[1].score


def test_no_citation_gives_no_invented_citation(three_docs: list[Document]) -> None:
    citations, unknown = resolve_citations(
        "Refunds take five days.", sources_from_documents(three_docs)
    )
    assert citations == [] and unknown == []


def test_format_source_shows_number_title_location_and_text(three_docs: list[Document]) -> None:
    first, second, third = sources_from_documents(three_docs)
    assert (
        format_source(first)
        == "[1] Doc 1 (/data/doc1.md, page 2)\nRefunds are paid within 5 business days."
    )
    assert format_source(second).startswith("[2] Doc 2 (/data/doc2.md, Pricing > Pro)\n")
    assert format_source(third, max_chars=10) == "[3] Doc 3 (/data/doc3.md)\nSupport i…"


def test_missing_metadata_falls_back() -> None:
    [source] = sources_from_documents([Document(page_content="x", metadata={"source": "/a/b.txt"})])
    assert (source.doc_id, source.title, source.score, source.page) == (
        "/a/b.txt",
        "b.txt",
        None,
        None,
    )
