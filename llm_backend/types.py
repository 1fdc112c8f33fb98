"""Plain data types crossing the ChatBackend seam.

Dataclasses, no pydantic: they are built and read inside the process. Field
names follow OpenAI's chat-completions wire format (``temperature``,
``max_tokens``, ``finish_reason``...), so mapping to an OpenAI-compatible server
is one-to-one. Tools stay plain OpenAI-style dicts (``ToolSpec``)::

    {"type": "function",
     "function": {"name": "search", "description": "...", "parameters": {...JSON schema...}}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls"]
ToolSpec = dict[str, Any]
"""An OpenAI function tool: ``{"type": "function", "function": {name, parameters, ...}}``."""
ToolChoice = Literal["auto", "none", "required"] | dict[str, Any]
"""``"auto" | "none" | "required"`` or ``{"type": "function", "function": {"name": ...}}``."""

_ROLES = ("system", "user", "assistant", "tool")
_FINISH_REASONS = ("stop", "length", "tool_calls")


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool requested by the model.

    Args:
        id: The call id; the tool's result message quotes it as ``tool_call_id``.
        name: The tool's name.
        arguments: The arguments as a JSON string, exactly as the model wrote them.
    """

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments decoded from JSON.

        Raises:
            ValueError: The model wrote something that is not a JSON object.
        """
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"tool call {self.name!r} has arguments that are not JSON: {self.arguments!r}"
            ) from exc
        if not isinstance(value, dict):
            raise ValueError(
                f"tool call {self.name!r} has arguments that are not a JSON object: "
                f"{self.arguments!r}"
            )
        return value

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI wire shape of this call."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation.

    Args:
        role: ``system``, ``user``, ``assistant`` or ``tool``.
        content: The text; may be ``None`` on an assistant message that only calls tools.
        tool_calls: The tools an assistant message calls.
        tool_call_id: On a ``tool`` message, the id of the call it answers.
        name: Optional participant or tool name.
    """

    role: Role
    content: str | None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"message role must be one of {_ROLES}, got {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r}")

    @classmethod
    def system(cls, content: str) -> ChatMessage:
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> ChatMessage:
        return cls("user", content)

    @classmethod
    def assistant(
        cls, content: str | None, tool_calls: list[ToolCall] | None = None
    ) -> ChatMessage:
        return cls("assistant", content, tool_calls=tool_calls or None)

    @classmethod
    def tool(cls, content: str, tool_call_id: str, name: str | None = None) -> ChatMessage:
        return cls("tool", content, tool_call_id=tool_call_id, name=name)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI wire shape of this message."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; ``None`` leaves a field at the backend's default.

    ``temperature=0`` means greedy decoding. ``top_k``, ``min_p`` and
    ``repetition_penalty`` are not OpenAI fields; OpenAI-compatible servers that
    know them (vLLM, our engine) take them as extra body fields.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for label, value in (
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ):
            if value is not None and not -2 <= value <= 2:
                raise ValueError(f"{label} must be in [-2, 2], got {value}")


@dataclass(frozen=True)
class ChatRequest:
    """Everything a backend needs to answer one chat turn.

    Args:
        messages: The conversation so far; at least one message.
        tools: OpenAI-style function tools the model may call.
        tool_choice: ``"auto"``, ``"none"``, ``"required"`` or a named function.
        response_format: OpenAI ``response_format``, e.g. ``{"type": "json_schema",
            "json_schema": {"name": ..., "schema": {...}}}``.
        sampling: Sampling options.
        stop: Strings that end generation (not included in the output).
        model: Overrides the backend's default model name.
    """

    messages: list[ChatMessage]
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    response_format: dict[str, Any] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("a chat request needs at least one message")
        for tool in self.tools or []:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not function.get("name"):
                raise ValueError(
                    "each tool must be an OpenAI function tool "
                    f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}"
                )
        if isinstance(self.tool_choice, str) and self.tool_choice not in (
            "auto",
            "none",
            "required",
        ):
            raise ValueError(
                f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                f"got {self.tool_choice!r}"
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError(f"tool_choice={self.tool_choice!r} given but no tools")
        if isinstance(self.tool_choice, dict):
            name = named_tool_choice(self.tool_choice)
            if name not in {t["function"]["name"] for t in self.tools or []}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")


def named_tool_choice(tool_choice: ToolChoice | None) -> str | None:
    """The function name a dict ``tool_choice`` forces, or ``None`` for string choices."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            "a named tool_choice must look like "
            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
        )
    return name


@dataclass(frozen=True)
class Usage:
    """Token counts of one call."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResponse:
    """A complete answer.

    Args:
        content: The text ("" when the model only called tools).
        tool_calls: The tools the model called, complete, in order.
        finish_reason: ``stop``, ``length`` or ``tool_calls``.
        usage: Token counts, when the backend reports them.
        model: The model that answered.
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    usage: Usage | None = None
    model: str = ""

    def __post_init__(self) -> None:
        if self.finish_reason not in _FINISH_REASONS:
            raise ValueError(
                f"finish_reason must be one of {_FINISH_REASONS}, got {self.finish_reason!r}"
            )

    def to_message(self) -> ChatMessage:
        """This answer as the assistant message to append to the conversation."""
        return ChatMessage.assistant(self.content or None, list(self.tool_calls))


@dataclass(frozen=True)
class ChatChunk:
    """One piece of a streamed answer.

    Content arrives as ``delta`` text pieces; concatenated they equal
    ``ChatResponse.content`` for the same request. Tool calls arrive complete
    (their argument fragments already joined) in a chunk of their own, in order.
    The last chunk of a stream carries ``finish_reason`` and, when the backend
    reports it, ``usage``.
    """

    delta: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
