"""The RAG chain over a real collection (real MiniLM, Chroma, BM25); scripted LLM answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.rag import RagAnswerer, RagConfig
from llm_backend import ChatResponse, ScriptedBackend
from tests.agents.collection import open_retriever

pytestmark = [pytest.mark.slow, pytest.mark.integration]


async def test_citations_map_to_the_real_chunks(helpcentre_data_dir: Path) -> None:
    backend = ScriptedBackend([ChatResponse("Within 14 days you get a full refund [1] [12].")])
    answerer = RagAnswerer(open_retriever(helpcentre_data_dir, k=4), backend, RagConfig(k=4))
    result = await answerer.answer("Can I cancel within 14 days and get a refund?")

    assert not result.refused
    assert result.best_score is not None and result.best_score > 0.4
    assert len(result.sources) == 4
    [citation] = result.citations
    assert result.unknown_citations == [12]
    first = result.sources[0]
    assert citation.doc_id == first.doc_id and citation.chunk_id == first.chunk_id
    assert citation.source.endswith("helpcentre/refunds.md")
    assert citation.title == "Refunds and cancellations"
    assert citation.section == first.section
    assert citation.section is not None
    assert citation.section.startswith("Refunds and cancellations > ")
    assert citation.snippet and citation.snippet[:40] in " ".join(first.text.split())
    prompt = backend.requests[0].messages[-1].content or ""
    assert prompt.startswith(f"Sources:\n\n[1] Refunds and cancellations ({first.source}, ")
    assert "Cooling-off period)\nNew customers may cancel within 14 days" in prompt


@pytest.mark.parametrize(
    "question",
    ["What is the capital of Mongolia?", "Who won the 1998 football world cup?"],
)
async def test_off_topic_questions_are_refused_by_the_default_threshold(
    helpcentre_data_dir: Path, question: str
) -> None:
    backend = ScriptedBackend([])
    answerer = RagAnswerer(open_retriever(helpcentre_data_dir), backend)
    result = await answerer.answer(question)
    assert result.refused and backend.requests == []
    assert result.best_score is not None and result.best_score < 0.25
