"""The agent's tools (LangChain tools with typed pydantic arguments) and their registry.

Built-in tools: ``knowledge_base_search`` over any LangChain retriever,
``web_search`` through ``ddgs``, ``calculator`` (a safe AST evaluator) and
``current_datetime``. Every tool turns its failures into a :class:`ToolError`,
which LangChain (``handle_tool_error=True``) hands back as an error tool result
rather than raising, so an agent loop carries on.

Example:
    >>> registry = default_registry(retriever=my_retriever)
    >>> def word_count(text: str) -> int:
    ...     '''Count the words in a text.'''
    ...     return len(text.split())
    >>> registry.register(word_count)
    >>> registry.get("calculator").invoke({"expression": "2 ** 10"})
    '1024'
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from agents.calculator import evaluate, format_number
from agents.errors import ToolError, ToolRegistryError
from agents.sources import (
    Source,
    aretrieve,
    format_sources,
    retrieve,
    snippet_of,
    sources_from_documents,
)

logger = logging.getLogger(__name__)

KNOWLEDGE_BASE_SEARCH = "knowledge_base_search"
WEB_SEARCH = "web_search"
CALCULATOR = "calculator"
CURRENT_DATETIME = "current_datetime"

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KB_SNIPPET_CHARS = 600
_WEB_SNIPPET_CHARS = 400

DdgsFactory = Callable[[float], Any]
"""Makes a ddgs client from a timeout in seconds; it needs ``.text(query, max_results=)``."""


# ---------------------------------------------------------------- argument schemas


class KnowledgeBaseSearchArgs(BaseModel):
    """Arguments of ``knowledge_base_search``."""

    query: str = Field(min_length=1, max_length=1000, description="What to look for.")
    k: int = Field(default=5, ge=1, le=20, description="How many passages to return.")


class WebSearchArgs(BaseModel):
    """Arguments of ``web_search``."""

    query: str = Field(min_length=1, max_length=500, description="The web search query.")
    max_results: int = Field(default=5, ge=1, le=10, description="How many results to return.")


class CalculatorArgs(BaseModel):
    """Arguments of ``calculator``."""

    expression: str = Field(
        min_length=1,
        max_length=500,
        description="An arithmetic expression, e.g. '(17 + 3) * 2 / 5' or 'sqrt(2) * pi'.",
    )


class CurrentDatetimeArgs(BaseModel):
    """Arguments of ``current_datetime``."""

    timezone: str = Field(
        default="UTC", description="An IANA time zone name, e.g. 'Europe/Paris' or 'UTC'."
    )


# ---------------------------------------------------------------- knowledge base


def make_knowledge_base_search(
    retriever: BaseRetriever,
    *,
    name: str = KNOWLEDGE_BASE_SEARCH,
    description: str | None = None,
) -> BaseTool:
    """A tool that searches ``retriever`` and returns numbered passages with their sources.

    The tool's content is ``[1] title (source, page)\\n text`` per passage; its
    artifact is the list of :class:`~agents.sources.Source` (the agent uses it to
    resolve citations in the final answer).

    Args:
        retriever: Any LangChain retriever whose documents carry ``doc_id``,
            ``source``, ``title``, ``page``/``section`` and ``score`` metadata.
        name: Tool name the model sees.
        description: What the model is told the tool does.
    """

    def _render(query: str, sources: list[Source]) -> tuple[str, list[Source]]:
        if not sources:
            return f"no passages in the knowledge base match {query!r}", []
        return format_sources(sources, max_chars=_KB_SNIPPET_CHARS), sources

    def _search(query: str, k: int = 5) -> tuple[str, list[Source]]:
        try:
            documents = retrieve(retriever, query, k)
        except Exception as exc:  # any retriever failure becomes a tool error
            raise ToolError(f"knowledge base search failed: {exc}") from exc
        return _render(query, sources_from_documents(documents))

    async def _asearch(query: str, k: int = 5) -> tuple[str, list[Source]]:
        try:
            documents = await aretrieve(retriever, query, k)
        except Exception as exc:  # any retriever failure becomes a tool error
            raise ToolError(f"knowledge base search failed: {exc}") from exc
        return _render(query, sources_from_documents(documents))

    return StructuredTool.from_function(
        func=_search,
        coroutine=_asearch,
        name=name,
        description=description
        or "Search the user's document collection. Returns numbered passages with their "
        "sources; cite them as [n] in the answer.",
        args_schema=KnowledgeBaseSearchArgs,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


# ---------------------------------------------------------------- web search


def _default_ddgs_factory(timeout_s: float) -> Any:
    from ddgs import DDGS

    return DDGS(timeout=max(1, math.ceil(timeout_s)))


def _format_web_results(query: str, results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return f"no web results for {query!r}"
    lines = []
    for number, item in enumerate(results, start=1):
        title = str(item.get("title") or "untitled")
        url = str(item.get("href") or item.get("url") or "")
        body = snippet_of(str(item.get("body") or ""), _WEB_SNIPPET_CHARS)
        lines.append(f"[{number}] {title} ({url})\n{body}")
    return "\n\n".join(lines)


def make_web_search(
    *,
    client_factory: DdgsFactory | None = None,
    timeout_s: float = 5.0,
    name: str = WEB_SEARCH,
) -> BaseTool:
    """A tool that searches the web with ``ddgs``.

    Offline, rate-limited, timed out, or any other ddgs failure: the tool
    result is ``"web search unavailable: <reason>"`` (an error result; the
    agent carries on).

    Args:
        client_factory: Makes the ddgs client from a timeout in seconds
            (default ``ddgs.DDGS``); tests inject one that fails.
        timeout_s: Bound on one search, in seconds.
        name: Tool name the model sees.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    factory = client_factory or _default_ddgs_factory

    def _search(query: str, max_results: int = 5) -> str:
        try:
            results = factory(timeout_s).text(query, max_results=max_results)
        except Exception as exc:  # ddgs raises many kinds; each means "unavailable"
            logger.info("web search failed for %r: %s", query, exc)
            raise ToolError(f"web search unavailable: {exc or type(exc).__name__}") from exc
        return _format_web_results(query, list(results or [])[:max_results])

    async def _asearch(query: str, max_results: int = 5) -> str:
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(_search, query, max_results), timeout=timeout_s
            )
        except TimeoutError:
            raise ToolError(f"web search unavailable: no answer within {timeout_s:g} s") from None

    return StructuredTool.from_function(
        func=_search,
        coroutine=_asearch,
        name=name,
        description="Search the web for current or general information not in the documents.",
        args_schema=WebSearchArgs,
        handle_tool_error=True,
    )


# ---------------------------------------------------------------- calculator, clock


def _calculator(expression: str) -> str:
    return format_number(evaluate(expression))


def make_calculator(name: str = CALCULATOR) -> BaseTool:
    """A tool that evaluates arithmetic safely (see :mod:`agents.calculator`)."""
    return StructuredTool.from_function(
        func=_calculator,
        name=name,
        description="Evaluate an arithmetic expression: numbers, + - * / // % **, "
        "parentheses, sqrt, log, exp, sin, cos, tan, abs, round, min, max, factorial, pi, e.",
        args_schema=CalculatorArgs,
        handle_tool_error=True,
    )


def make_current_datetime(
    *, now: Callable[[], datetime] | None = None, name: str = CURRENT_DATETIME
) -> BaseTool:
    """A tool that tells the current date and time in a time zone.

    Args:
        now: Returns the current aware UTC datetime (tests inject a fixed one).
        name: Tool name the model sees.
    """
    clock = now or (lambda: datetime.now(UTC))

    def _current_datetime(timezone: str = "UTC") -> str:
        try:
            zone = ZoneInfo(timezone.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(
                f"unknown timezone {timezone!r}; use an IANA name such as 'Europe/Paris' or 'UTC'"
            ) from None
        moment = clock().astimezone(zone)
        return f"{moment.isoformat(timespec='seconds')} ({moment:%A}, {zone.key})"

    return StructuredTool.from_function(
        func=_current_datetime,
        name=name,
        description="The current date, time and weekday in an IANA time zone.",
        args_schema=CurrentDatetimeArgs,
        handle_tool_error=True,
    )


# ---------------------------------------------------------------- registry


class ToolRegistry:
    """Named tools an agent profile can pick from.

    Register LangChain tools, or plain typed functions: the registry builds a
    ``StructuredTool`` whose pydantic argument schema comes from the signature and
    whose description comes from the docstring (Google-style ``Args:`` become the
    argument descriptions).

    Example:
        >>> registry = ToolRegistry([make_calculator()])
        >>> def shout(text: str) -> str:
        ...     '''Upper-case a text.'''
        ...     return text.upper()
        >>> registry.register(shout).name
        'shout'
        >>> registry.names()
        ['calculator', 'shout']
    """

    def __init__(self, tools: Iterable[BaseTool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, BaseTool] = {}
        for tool in tools:
            self.register(tool)

    def register(
        self,
        tool: BaseTool | Callable[..., Any],
        name: str | None = None,
        *,
        replace: bool = False,
    ) -> BaseTool:
        """Add a tool, or a typed function turned into one; returns the registered tool.

        Raises:
            ToolRegistryError: bad name, duplicate name (unless ``replace``), or a
                function without a docstring or with an unannotated parameter.
        """
        if isinstance(tool, BaseTool):
            built = (
                tool
                if name is None or name == tool.name
                else tool.model_copy(update={"name": name})
            )
        elif callable(tool):
            built = _tool_from_function(tool, name)
        else:
            raise ToolRegistryError(f"cannot register {tool!r}: not a BaseTool or a function")
        if not _TOOL_NAME.match(built.name):
            raise ToolRegistryError(
                f"tool name {built.name!r} must be 1-64 letters, digits, '_' or '-'"
            )
        if built.name in self._tools and not replace:
            raise ToolRegistryError(f"a tool named {built.name!r} is already registered")
        self._tools[built.name] = built
        return built

    def get(self, name: str) -> BaseTool:
        """The tool called ``name``.

        Raises:
            ToolRegistryError: no such tool (the message lists the known ones).
        """
        try:
            return self._tools[name]
        except KeyError:
            raise ToolRegistryError(
                f"unknown tool {name!r}; registered: {', '.join(self.names()) or 'none'}"
            ) from None

    def select(self, names: Sequence[str]) -> list[BaseTool]:
        """The tools called ``names``, in that order (an agent profile's allow-list)."""
        return [self.get(n) for n in names]

    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)


def _tool_from_function(function: Callable[..., Any], name: str | None) -> BaseTool:
    tool_name = name or getattr(function, "__name__", "")
    doc = inspect.getdoc(function)
    if not doc:
        raise ToolRegistryError(
            f"function {tool_name!r} needs a docstring: the model reads it to decide when "
            "to call the tool"
        )
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolRegistryError(
                f"function {tool_name!r}: *args/**kwargs cannot become tool arguments"
            )
        if parameter.annotation is inspect.Parameter.empty:
            raise ToolRegistryError(
                f"function {tool_name!r}: parameter {parameter.name!r} needs a type annotation"
            )
    is_async = inspect.iscoroutinefunction(function)
    has_args_section = "Args:" in doc
    return StructuredTool.from_function(
        func=None if is_async else function,
        coroutine=function if is_async else None,
        name=tool_name,
        # with an Args: section LangChain splits the docstring into the summary and
        # per-argument descriptions itself
        description=None if has_args_section else doc,
        parse_docstring=has_args_section,
        error_on_invalid_docstring=False,
        handle_tool_error=True,
    )


def default_registry(
    retriever: BaseRetriever | None = None,
    *,
    ddgs_factory: DdgsFactory | None = None,
    web_timeout_s: float = 5.0,
) -> ToolRegistry:
    """The built-in tools: calculator, current_datetime, web_search, and (with a
    retriever) knowledge_base_search."""
    registry = ToolRegistry(
        [
            make_calculator(),
            make_current_datetime(),
            make_web_search(client_factory=ddgs_factory, timeout_s=web_timeout_s),
        ]
    )
    if retriever is not None:
        registry.register(make_knowledge_base_search(retriever))
    return registry
