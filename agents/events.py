"""Events streamed by the RAG answerer and the tool agent (for the API and UI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agents.sources import Citation


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """A piece of answer text, in generation order."""

    text: str


@dataclass(slots=True, frozen=True)
class CitationsEvent:
    """The validated citations of the answer (sent once, after the last token)."""

    citations: list[Citation]


@dataclass(slots=True, frozen=True)
class ToolCallEvent:
    """The model asked for a tool call (sent before the tool runs, or is refused)."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(slots=True, frozen=True)
class ToolResultEvent:
    """The result of one tool call; ``error`` is true when the tool failed or was refused."""

    name: str
    result: str
    id: str
    error: bool = False


@dataclass(slots=True, frozen=True)
class DoneEvent:
    """The last event of a run; ``answer`` is a ``RagAnswer`` or an ``AgentResult``."""

    answer: Any = field(default=None)
