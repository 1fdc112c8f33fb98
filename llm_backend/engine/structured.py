"""Grammar-constrained output with llguidance: JSON schemas, tool calls, token masks.

The server turns ``response_format`` / ``tools`` + ``tool_choice`` into one grammar
string (``GrammarCompiler``); the scheduler gives each constrained request its own
``llguidance.LLMatcher`` and, every step, writes that matcher's allowed-token bitmask
into a ``(B, ceil(V/32))`` int32 buffer and masks disallowed logits to ``-inf``
before sampling (``apply_token_bitmask``).

Tool calls use the Hermes / Qwen format, ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``: SmolLM2's chat template knows nothing of tools, so the tool list
goes into the system prompt (``tool_system_prompt``) and the reply is parsed back
into OpenAI ``tool_calls`` (``parse_tool_calls``).

Example:
    >>> compiler = GrammarCompiler(loaded.tokenizer)
    >>> grammar = compiler.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    >>> matcher = compiler.matcher(grammar)
    >>> bitmask = allocate_bitmask(1, compiler.vocab_size)
    >>> fill_bitmask(matcher, bitmask, 0)
    >>> apply_token_bitmask(logits, torch.from_numpy(bitmask))  # logits (1, V)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import numpy as np
import torch
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from llm_backend.engine.errors import EngineError

logger = logging.getLogger(__name__)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ToolMode = Literal["auto", "required", "named"]

# Compact JSON with one space after separators: no runaway whitespace at high temperature.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)


class StructuredOutputError(EngineError):
    """A JSON schema, tool definition or tool choice cannot be turned into a grammar."""


@dataclass(frozen=True)
class ToolSpec:
    """One function tool as the engine sees it (OpenAI's ``tools[i].function``)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI ``{"type": "function", "function": {...}}`` shape."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ParsedToolCall:
    """A tool call found in generated text; ``arguments`` is a JSON string (OpenAI shape)."""

    id: str
    name: str
    arguments: str


def _tokenizer_json(tokenizer: Any) -> str:
    """The ``tokenizers`` JSON of an ``EngineTokenizer`` (or anything exposing a backend)."""
    for attribute in ("backend_tokenizer", "backend", "_backend"):
        backend = getattr(tokenizer, attribute, None)
        if backend is not None and hasattr(backend, "to_str"):
            return str(backend.to_str())
    raise StructuredOutputError(
        f"tokenizer {type(tokenizer).__name__} exposes no `tokenizers` backend for llguidance"
    )


def tool_call_schema(tools: list[ToolSpec]) -> dict[str, Any]:
    """JSON schema of ``{"name": <one tool>, "arguments": <its parameters>}``."""
    if not tools:
        raise StructuredOutputError("tool_choice requires at least one tool in `tools`")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                "arguments": tool.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


class GrammarCompiler:
    """Builds and validates llguidance grammars for one tokenizer; makes matchers.

    Building the llguidance tokenizer takes about half a second and ~55 MiB for
    SmolLM2's vocabulary, so one per engine is shared (matchers are cheap), built on the
    first structured request: an engine that never gets one never holds it.

    Args:
        tokenizer: The engine tokenizer (its ``tokenizers`` JSON and ``eos_token_ids``).
        vocab_size: Size of the model's logits; defaults to ``tokenizer.vocab_size``.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.vocab_size = int(vocab_size or tokenizer.vocab_size)
        self._tokenizer = tokenizer
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def _lltokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer, built once on first use (thread-safe)."""
        if self._built is None:
            with self._lock:
                if self._built is None:
                    eos = sorted(int(i) for i in self._tokenizer.eos_token_ids)
                    self._built = llguidance.LLTokenizer(
                        _tokenizer_json(self._tokenizer),
                        n_vocab=self.vocab_size,
                        eos_token=eos or None,
                    )
        return self._built

    def _validated(self, grammar: str, what: str) -> str:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._lltokenizer
        )
        if is_error:
            raise StructuredOutputError(f"invalid {what}: {messages[0] if messages else grammar}")
        return grammar

    def json_schema(self, schema: dict[str, Any] | None) -> str:
        """Grammar for one JSON value matching ``schema`` (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise StructuredOutputError(
                f"json schema must be an object, got {type(schema).__name__}"
            )
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema,
                defaults=JSON_OPTIONS,  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise StructuredOutputError(f"invalid json schema: {exc}") from exc
        return self._validated(grammar, "json schema")

    def tool_call(self, tools: list[ToolSpec], mode: ToolMode) -> str:
        """Grammar for a reply in the ``<tool_call>{json}</tool_call>`` format.

        ``required`` / ``named``: exactly one call to one of ``tools`` (pass only the
        named tool for ``named``). ``auto``: either plain text (not starting with ``<``)
        or one tool call.
        """
        schema = tool_call_schema(tools)
        call = f'"{TOOL_CALL_OPEN}" call "{TOOL_CALL_CLOSE}"'
        if mode == "auto":
            lark = f"start: TEXT | {call}\nTEXT: /[^<](.|\\n)*/\n"
        else:
            lark = f"start: {call}\n"
        lark += f"call: %json {json.dumps(schema)}\n"
        return self._validated(llguidance.LLMatcher.grammar_from_lark(lark), "tool definitions")

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for ``grammar`` (one per request)."""
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"grammar rejected: {matcher.get_error()}")
        return matcher


def allocate_bitmask(batch_size: int, vocab_size: int) -> np.ndarray:
    """An all-allowed ``(batch_size, ceil(vocab_size / 32))`` int32 bitmask."""
    return allocate_token_bitmask(batch_size, vocab_size)


def fill_bitmask(matcher: llguidance.LLMatcher, bitmask: np.ndarray, row: int) -> None:
    """Write ``matcher``'s allowed next tokens into ``bitmask[row]``."""
    fill_next_token_bitmask(matcher, bitmask, row)


_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits`` (B, V) to ``-inf`` wherever ``bitmask`` (B, W) int32 has a 0 bit.

    Bit ``j`` of word ``w`` stands for token ``32 * w + j``; tokens past ``32 * W`` are
    disallowed.
    """
    B, V = logits.shape
    words = bitmask.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> _BIT_POSITIONS) & 1).bool()  # (B, W, 32)
    allowed = allowed.view(B, words * 32)[:, :V]  # (B, min(V, 32W))
    if allowed.shape[1] < V:
        pad = torch.zeros(B, V - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat((allowed, pad), dim=1)
    logits.masked_fill_(~allowed.to(logits.device), float("-inf"))


def tool_system_prompt(tools: list[ToolSpec]) -> str:
    """Text that tells a Hermes-style model which tools exist and how to call them."""
    signatures = "\n".join(json.dumps(tool.as_openai(), ensure_ascii=False) for tool in tools)
    return (
        "You may call one or more functions to assist with the user query.\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call a function, reply with a JSON object holding the function name and its "
        f"arguments within {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n"
        f'{TOOL_CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}'
        f"{TOOL_CALL_CLOSE}"
    )


def format_tool_call(name: str, arguments: str | dict[str, Any]) -> str:
    """An assistant tool call rendered back into the model's text format."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            logger.debug("tool call arguments for %s are not JSON; kept as a string", name)
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{payload}{TOOL_CALL_CLOSE}"


def parse_tool_calls(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Split generated ``text`` into plain content and the tool calls it holds.

    Returns the text outside ``<tool_call>`` blocks (stripped) and the calls whose
    body is a JSON object with a string ``name``; other blocks stay in the content.
    """
    calls: list[ParsedToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL_RE.finditer(text):
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            continue
        arguments = payload.get("arguments", {})
        calls.append(
            ParsedToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                name=payload["name"],
                arguments=json.dumps(arguments, ensure_ascii=False),
            )
        )
        kept.append(text[last : match.start()])
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls
