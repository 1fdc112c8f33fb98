"""The built-in tools and the registry (no test contacts the internet)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import ToolMessage

from agents.errors import ToolRegistryError
from agents.sources import Source
from agents.tools import (
    ToolRegistry,
    default_registry,
    make_current_datetime,
    make_knowledge_base_search,
    make_web_search,
)
from tests.agents.conftest import ListRetriever


class OfflineDdgs:
    """A ddgs client that fails as ddgs does without a network."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls: list[tuple[str, int]] = []

    def text(self, query: str, max_results: int = 5) -> list[dict[str, Any]]:
        self.calls.append((query, max_results))
        raise self.error


def test_web_search_offline_returns_a_clear_error_result() -> None:
    from ddgs.exceptions import DDGSException

    client = OfflineDdgs(DDGSException("No results found. ConnectError: network unreachable"))
    tool = make_web_search(client_factory=lambda timeout: client, timeout_s=2)
    result = tool.invoke({"query": "ragloom", "max_results": 3})
    assert result.startswith("web search unavailable: ")
    assert "network unreachable" in result
    assert client.calls == [("ragloom", 3)]


async def test_web_search_rate_limited_async_path_is_an_error_tool_message() -> None:
    from ddgs.exceptions import RatelimitException

    tool = make_web_search(
        client_factory=lambda t: OfflineDdgs(RatelimitException("202 Ratelimit"))
    )
    message = await tool.ainvoke(
        {"type": "tool_call", "id": "c1", "name": "web_search", "args": {"query": "x"}}
    )
    assert isinstance(message, ToolMessage)
    assert message.status == "error"
    assert message.content == "web search unavailable: 202 Ratelimit"


async def test_web_search_hung_client_is_bounded_by_the_timeout() -> None:
    class Hung:
        def text(self, query: str, max_results: int = 5) -> list[dict[str, Any]]:
            import time

            time.sleep(1)
            return []

    tool = make_web_search(client_factory=lambda t: Hung(), timeout_s=0.2)
    started = asyncio.get_running_loop().time()
    result = await tool.ainvoke({"query": "x"})
    assert asyncio.get_running_loop().time() - started < 2.0
    assert result == "web search unavailable: no answer within 0.2 s"


def test_web_search_formats_results() -> None:
    class Client:
        def text(self, query: str, max_results: int = 5) -> list[dict[str, Any]]:
            return [
                {"title": "A", "href": "https://a.example", "body": "alpha text"},
                {"title": "B", "href": "https://b.example", "body": "beta"},
                {"title": "C", "href": "https://c.example", "body": "gamma"},
            ]

    result = make_web_search(client_factory=lambda t: Client()).invoke(
        {"query": "q", "max_results": 2}
    )
    assert result == "[1] A (https://a.example)\nalpha text\n\n[2] B (https://b.example)\nbeta"


def test_web_search_rejects_bad_arguments() -> None:
    tool = make_web_search(client_factory=lambda t: OfflineDdgs(RuntimeError("unused")))
    with pytest.raises(ValueError, match="max_results"):
        tool.invoke({"query": "x", "max_results": 500})


def test_current_datetime_in_a_timezone_and_bad_timezone() -> None:
    fixed = datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
    tool = make_current_datetime(now=lambda: fixed)
    assert (
        tool.invoke({"timezone": "Asia/Tokyo"}) == "2024-03-01T21:30:00+09:00 (Friday, Asia/Tokyo)"
    )
    assert tool.invoke({}) == "2024-03-01T12:30:00+00:00 (Friday, UTC)"
    bad = tool.invoke({"timezone": "Mars/Olympus"})
    assert bad.startswith("unknown timezone 'Mars/Olympus'")
    assert "unknown timezone" in tool.invoke({"timezone": "../../etc/passwd"})


async def test_knowledge_base_search_returns_numbered_passages_and_sources(
    three_docs: list[Document],
) -> None:
    retriever = ListRetriever(documents=three_docs, queries=[])
    tool = make_knowledge_base_search(retriever)
    message = await tool.ainvoke(
        {"type": "tool_call", "id": "c1", "name": tool.name, "args": {"query": "refund", "k": 2}}
    )
    assert retriever.queries == ["refund"]
    assert message.content.startswith("[1] Doc 1 (/data/doc1.md, page 2)\nRefunds are paid")
    assert "[2] Doc 2" in message.content and "[3]" not in message.content
    assert [s.doc_id for s in message.artifact] == ["doc1", "doc2"]
    assert all(isinstance(s, Source) for s in message.artifact)


def test_knowledge_base_search_empty_and_failing_retriever() -> None:
    assert "no passages" in make_knowledge_base_search(ListRetriever(documents=[])).invoke(
        {"query": "x"}
    )

    class Broken(ListRetriever):
        def _get_relevant_documents(self, query: str, **kwargs: Any) -> list[Document]:
            raise RuntimeError("collection 'faq' not found")

    result = make_knowledge_base_search(Broken(documents=[])).invoke({"query": "x"})
    assert result == "knowledge base search failed: collection 'faq' not found"


def test_registry_builds_typed_tools_from_plain_functions() -> None:
    registry = ToolRegistry()

    def shipping_cost(weight_kg: float, express: bool = False) -> str:
        """Shipping cost of a parcel.

        Args:
            weight_kg: Weight of the parcel in kilograms.
            express: Next-day delivery.
        """
        return f"{weight_kg * (9 if express else 4):.2f} EUR"

    tool = registry.register(shipping_cost)
    assert tool.name == "shipping_cost"
    assert tool.description == "Shipping cost of a parcel."
    schema = tool.args
    assert schema["weight_kg"]["type"] == "number"
    assert schema["weight_kg"]["description"] == "Weight of the parcel in kilograms."
    assert schema["express"]["default"] is False
    assert tool.invoke({"weight_kg": 2, "express": True}) == "18.00 EUR"
    with pytest.raises(ValueError, match="weight_kg"):
        tool.invoke({"weight_kg": "heavy"})


async def test_registry_async_function_and_rename() -> None:
    registry = ToolRegistry()

    async def echo(text: str) -> str:
        """Repeat a text."""
        return text

    tool = registry.register(echo, name="say")
    assert registry.names() == ["say"] and "say" in registry
    assert await tool.ainvoke({"text": "hi"}) == "hi"


def test_registry_refuses_bad_registrations() -> None:
    registry = default_registry()
    assert registry.names() == ["calculator", "current_datetime", "web_search"]

    def no_doc(x: int) -> int:
        return x

    def untyped(x):  # type: ignore[no-untyped-def]
        """Untyped."""
        return x

    with pytest.raises(ToolRegistryError, match="needs a docstring"):
        registry.register(no_doc)
    with pytest.raises(ToolRegistryError, match="parameter 'x' needs a type annotation"):
        registry.register(untyped)
    with pytest.raises(ToolRegistryError, match="already registered"):
        registry.register(registry.get("calculator"))
    with pytest.raises(ToolRegistryError, match="must be 1-64 letters"):
        registry.register(registry.get("calculator"), name="rm -rf")
    with pytest.raises(ToolRegistryError, match="unknown tool 'shell'; registered: calculator"):
        registry.select(["calculator", "shell"])
