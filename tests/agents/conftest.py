"""Shared helpers of the agents tests: an in-memory retriever over fixed documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field


class ListRetriever(BaseRetriever):
    """Returns its fixed documents (best first), at most ``k``; records each query."""

    documents: list[Document]
    k: int = 5
    queries: list[str] = Field(default_factory=list)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        self.queries.append(query)
        return self.documents[: self.k]


def doc(
    text: str, number: int, *, dense: float | None = 0.6, page: int | None = None, **extra: Any
) -> Document:
    """A document with the metadata the hybrid retriever sets."""
    metadata: dict[str, Any] = {
        "doc_id": f"doc{number}",
        "chunk_id": f"doc{number}:0",
        "source": f"/data/doc{number}.md",
        "title": f"Doc {number}",
        "score": 1.0 / (60 + number),
        "dense_score": dense,
        "bm25_score": 3.0,
    }
    if page is not None:
        metadata["page"] = page
    metadata.update(extra)
    return Document(page_content=text, metadata=metadata)


@pytest.fixture
def three_docs() -> list[Document]:
    return [
        doc("Refunds are paid within 5 business days.", 1, page=2),
        doc("The Pro plan costs 12 euros per seat per month.", 2, section="Pricing > Pro"),
        doc("Support is open Monday to Friday, 9:00-17:00 CET.", 3),
    ]


@pytest.fixture(scope="session")
def helpcentre_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding the real ``helpcentre`` collection (MiniLM, Chroma, BM25)."""
    from tests.agents.collection import build_collection

    data_dir = tmp_path_factory.mktemp("agents-data")
    build_collection(data_dir)
    return data_dir
