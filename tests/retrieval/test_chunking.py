"""TokenChunker with the real MiniLM tokenizer: budgets, groups, headings, ids."""

from __future__ import annotations

import functools
import itertools
import random
import re
from typing import Any

import pytest

from retrieval.chunking import TokenChunker
from retrieval.models import resolve_model_path
from retrieval.types import SourceDocument, TextBlock
from tests.retrieval.conftest import load_sample


@functools.cache
def chunker(size: int = 256, overlap: int = 32, heading: bool = True) -> TokenChunker:
    """One chunker per configuration for the whole module (the tokenizer loads once)."""
    return TokenChunker("all-MiniLM-L6-v2", size, overlap, include_heading=heading)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    """An independent tokenizer instance to count tokens the way the embedder will."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def real_docs() -> list[SourceDocument]:
    """A long PDF (R-intro, pages) and a long HTML page (sections), loaded once."""
    return [*load_sample("pdf/R-intro.pdf"), *load_sample("html/datetime.html")]


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def paragraph(rng: random.Random, n_words: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "install", "server", "config", "retry", "token"]
    vocab += ["naïve", "café", "x86_64", "ä", "日本語", "-", "(", ")", "42", "3.14", "e-mail"]
    out = []
    for i in range(n_words):
        out.append(rng.choice(vocab))
        if i % 13 == 12:
            out.append(rng.choice([".", "!", "?", ";", ",", ".\n"]))
    return " ".join(out)


# ------------------------------------------------------------------ config validation


def test_invalid_settings_name_the_value() -> None:
    with pytest.raises(ValueError, match="chunk_overlap must be < chunk_size, got 300 >= 256"):
        TokenChunker(chunk_size=256, chunk_overlap=300)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 16, got 4"):
        TokenChunker(chunk_size=4, chunk_overlap=0)
    with pytest.raises(ValueError, match="chunk_overlap must be an int >= 0, got -1"):
        TokenChunker(chunk_overlap=-1)


def test_tokenizer_loads_lazily() -> None:
    fresh = TokenChunker()
    assert fresh._backend is None
    assert fresh.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert fresh._backend is not None


# ------------------------------------------------------------------ budgets


@pytest.mark.parametrize(("size", "overlap"), [(256, 32), (64, 8), (32, 0)])
def test_every_chunk_fits_the_budget_on_real_documents(
    size: int, overlap: int, hf_tokenizer: Any, real_docs: list[SourceDocument]
) -> None:
    splitter = chunker(size, overlap)
    for doc in real_docs:
        chunks = splitter.split(doc, "d")
        assert len(chunks) > 20
        counts = [len(ids) for ids in hf_tokenizer([c.text for c in chunks])["input_ids"]]
        assert max(counts) <= size, (doc.source, max(counts))
        # chunks are filled, not cut tiny: the median uses most of the budget
        assert sorted(counts)[len(counts) // 2] > size * 0.5


def test_budget_holds_on_adversarial_text(hf_tokenizer: Any) -> None:
    rng = random.Random(7)
    blocks = [
        TextBlock(text=paragraph(rng, 900), section="Mixed"),
        TextBlock(text="abc-" * 1500, section="No spaces at all"),
        TextBlock(text="".join(rng.choice("日本語中文字") for _ in range(3000)), page=2),
        TextBlock(text=("https://example.com/" + "a1/" * 40 + " ") * 30, page=2),
    ]
    doc = SourceDocument(source="/x", title="x", blocks=blocks)
    for size, overlap in [(64, 8), (256, 32)]:
        chunks = chunker(size, overlap).split(doc, "adv")
        assert max(n_tokens(hf_tokenizer, c.text) for c in chunks) <= size
    # Without overlap and headings, the chunks put back together are the text: nothing lost.
    chunks = chunker(64, 0, heading=False).split(doc, "adv")
    assert max(n_tokens(hf_tokenizer, c.text) for c in chunks) <= 64
    assert "".join("".join(c.text.split()) for c in chunks) == "".join(
        "".join(b.text.split()) for b in blocks
    )


def test_long_heading_is_cut_to_leave_room(hf_tokenizer: Any) -> None:
    section = " > ".join(f"Heading number {i}" for i in range(40))
    doc = SourceDocument(
        source="/x",
        title="x",
        blocks=[TextBlock(text=paragraph(random.Random(1), 300), section=section)],
    )
    chunks = chunker(64, 8).split(doc, "h")
    assert all(n_tokens(hf_tokenizer, c.text) <= 64 for c in chunks)
    first_line = chunks[0].text.split("\n", 1)[0]
    assert section.startswith(first_line) and len(first_line) < len(section)
    assert chunks[0].section == section  # metadata keeps the full path


# ------------------------------------------------------------------ groups, headings, ids


def make_doc() -> SourceDocument:
    rng = random.Random(3)
    return SourceDocument(
        source="/docs/guide.pdf",
        title="Guide",
        blocks=[
            TextBlock(text="Short intro.", page=1, section=None),
            TextBlock(text="  \n ", page=1, section="Install"),
            TextBlock(text=paragraph(rng, 400), page=1, section="Install"),
            TextBlock(text="Second block, same page and section.", page=1, section="Install"),
            TextBlock(text=paragraph(rng, 60), page=2, section="Install"),
            TextBlock(text="Linux steps.", page=2, section="Install > On Linux"),
            TextBlock(text="", page=3, section="Empty"),
        ],
        metadata={"format": "pdf", "pages": 3},
    )


def test_chunks_never_mix_pages_or_sections() -> None:
    doc = make_doc()
    chunks = chunker(64, 8, heading=False).split(doc, "g")
    groups: dict[tuple[int | None, str | None], str] = {}
    for block in doc.blocks:
        if block.text.strip():
            key = (block.page, block.section)
            groups[key] = groups.get(key, "") + " " + block.text
    assert {(c.page, c.section) for c in chunks} == set(groups)
    for chunk in chunks:
        group_text = " ".join(groups[(chunk.page, chunk.section)].split())
        assert " ".join(chunk.text.split()) in group_text
    assert next(c.section for c in chunks if c.page == 1) is None
    assert chunks[-1].text == "Linux steps."
    assert "Second block, same page and section." in " ".join(
        c.text for c in chunks if (c.page, c.section) == (1, "Install")
    )


def test_heading_line_is_prepended_and_counted(hf_tokenizer: Any) -> None:
    chunks = chunker(64, 8).split(make_doc(), "g")
    assert chunks[0].text == "Short intro."  # no section, no heading line
    for chunk in chunks[1:]:
        assert chunk.section is not None
        assert chunk.text.startswith(chunk.section + "\n")
        assert n_tokens(hf_tokenizer, chunk.text) <= 64
    assert chunks[-1].text == "Install > On Linux\nLinux steps."


def test_ids_indexes_and_document_fields() -> None:
    doc = make_doc()
    chunks = chunker(64, 8).split(doc, "doc-7")
    assert [c.chunk_id for c in chunks] == [f"doc-7:{i}" for i in range(len(chunks))]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert (chunk.doc_id, chunk.source, chunk.title) == ("doc-7", doc.source, "Guide")
        assert chunk.metadata == doc.metadata
        assert chunk.metadata is not doc.metadata
        assert chunk.text == chunk.text.strip() and chunk.text


def test_overlap_repeats_text_between_neighbours() -> None:
    # Overlap is made of whole pieces (here short sentences) up to chunk_overlap tokens.
    rng = random.Random(5)
    sentences = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(4))]
    sentences += [f"Step {i} is {rng.choice(['quick', 'slow', 'safe'])}." for i in range(300)]
    doc = SourceDocument(source="/x", title="x", blocks=[TextBlock(text=" ".join(sentences))])
    overlapping = chunker(64, 16, heading=False).split(doc, "o")
    disjoint = chunker(64, 0, heading=False).split(doc, "o")
    assert len(overlapping) > len(disjoint) > 5

    def shared_words(a: str, b: str) -> int:
        tail, head = words(a), words(b)
        common = [k for k in range(1, min(len(tail), len(head)) + 1) if tail[-k:] == head[:k]]
        return max(common, default=0)

    assert all(shared_words(a.text, b.text) >= 3 for a, b in itertools.pairwise(overlapping))
    assert all(shared_words(a.text, b.text) == 0 for a, b in itertools.pairwise(disjoint))


def test_whitespace_only_document_gives_no_chunks() -> None:
    doc = SourceDocument(source="/x", title="x", blocks=[TextBlock(text=" \n\t "), TextBlock("")])
    assert chunker().split(doc, "e") == []
    with pytest.raises(ValueError, match="doc_id"):
        chunker().split(doc, "")
