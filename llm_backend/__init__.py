"""The LLM backend seam: one ChatBackend protocol, several implementations.

- ``ChatBackend``: the Protocol (``chat``, ``stream``, ``health``, ``count_tokens``).
- ``OpenAICompatBackend``: any OpenAI-compatible server (vLLM, our engine's server).
- ``LocalEngineBackend``: our engine, in-process (imports torch when first used).
- ``ChatBackendModel``: a LangChain chat model over any ChatBackend.
- ``ScriptedBackend``: deterministic playback for tests of the layers above.
- ``fit_to_context``: trim a prompt to the context window.

Importing this package is cheap: the backends load their libraries on first access.

Example:
    >>> from llm_backend import ChatMessage, ChatRequest, OpenAICompatBackend
    >>> backend = OpenAICompatBackend("http://127.0.0.1:8000/v1", "smollm2-135m")
    >>> reply = await backend.chat(ChatRequest([ChatMessage.user("Hello")]))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llm_backend.context import FittedMessages, approximate_token_count, fit_to_context
from llm_backend.errors import BackendError, BackendUnavailable, BadRequest, ContextTooLong
from llm_backend.protocol import ChatBackend
from llm_backend.scripted import ScriptedBackend
from llm_backend.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    SamplingOptions,
    ToolCall,
    ToolSpec,
    Usage,
)

if TYPE_CHECKING:
    from llm_backend.langchain_adapter import ChatBackendModel
    from llm_backend.local_engine import LocalEngineBackend
    from llm_backend.openai_compat import OpenAICompatBackend

_LAZY = {
    "OpenAICompatBackend": "llm_backend.openai_compat",
    "LocalEngineBackend": "llm_backend.local_engine",
    "ChatBackendModel": "llm_backend.langchain_adapter",
}

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BadRequest",
    "ChatBackend",
    "ChatBackendModel",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "ContextTooLong",
    "FittedMessages",
    "LocalEngineBackend",
    "OpenAICompatBackend",
    "SamplingOptions",
    "ScriptedBackend",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "approximate_token_count",
    "fit_to_context",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llm_backend' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
