"""Answering on top of retrieval: the RAG chain, the tool-using agent and its tools.

- ``RagAnswerer``: retrieve, prompt with numbered sources, stream an answer whose
  ``[n]`` citations are checked against the sources given (``RagAnswer``).
- ``ToolAgent``: LangChain's agent loop with an ``AgentProfile`` allow-list,
  bounded steps, per-tool timeouts and a streamed tool trace (``AgentResult``).
- Tools: ``knowledge_base_search``, ``web_search``, ``calculator``,
  ``current_datetime``, and ``ToolRegistry`` for your own typed functions.
- Events streamed to the API/UI: ``TokenEvent``, ``CitationsEvent``,
  ``ToolCallEvent``, ``ToolResultEvent``, ``DoneEvent``.

Example:
    >>> from agents import RagAnswerer, TokenEvent
    >>> answerer = RagAnswerer(retriever, backend)
    >>> async for event in answerer.stream("How do refunds work?"):
    ...     if isinstance(event, TokenEvent): print(event.text, end="")
"""

from agents.agent import AgentEvent, AgentProfile, AgentResult, ToolAgent, ToolTrace
from agents.calculator import evaluate
from agents.errors import AgentError, CalculatorError, ToolError, ToolRegistryError
from agents.events import CitationsEvent, DoneEvent, TokenEvent, ToolCallEvent, ToolResultEvent
from agents.rag import RagAnswer, RagAnswerer, RagConfig, RagEvent, RagTimings
from agents.sources import (
    Citation,
    Source,
    parse_citation_numbers,
    resolve_citations,
    sources_from_documents,
)
from agents.tools import (
    CALCULATOR,
    CURRENT_DATETIME,
    KNOWLEDGE_BASE_SEARCH,
    WEB_SEARCH,
    ToolRegistry,
    default_registry,
    make_calculator,
    make_current_datetime,
    make_knowledge_base_search,
    make_web_search,
)

__all__ = [
    "CALCULATOR",
    "CURRENT_DATETIME",
    "KNOWLEDGE_BASE_SEARCH",
    "WEB_SEARCH",
    "AgentError",
    "AgentEvent",
    "AgentProfile",
    "AgentResult",
    "CalculatorError",
    "Citation",
    "CitationsEvent",
    "DoneEvent",
    "RagAnswer",
    "RagAnswerer",
    "RagConfig",
    "RagEvent",
    "RagTimings",
    "Source",
    "TokenEvent",
    "ToolAgent",
    "ToolCallEvent",
    "ToolError",
    "ToolRegistry",
    "ToolRegistryError",
    "ToolResultEvent",
    "ToolTrace",
    "default_registry",
    "evaluate",
    "make_calculator",
    "make_current_datetime",
    "make_knowledge_base_search",
    "make_web_search",
    "parse_citation_numbers",
    "resolve_citations",
    "sources_from_documents",
]
