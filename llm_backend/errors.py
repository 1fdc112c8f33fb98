"""The llm_backend exception family.

Every backend raises these (never a client library's own exceptions), so the
layers above handle one small set:

- ``BackendUnavailable``: the backend cannot be reached, or did not answer in time.
- ``ContextTooLong``: the prompt does not fit the model's context window.
- ``BadRequest``: the backend refused the request as malformed (a 4xx).
- ``BackendError``: the base class, and anything else that went wrong.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of every llm_backend error."""


class BackendUnavailable(BackendError):
    """The backend is unreachable, refused the connection, or timed out.

    Args:
        backend: The backend's name, e.g. ``"openai-compat"``.
        url: Where it was looked for (a URL, or a model path for in-process backends).
        reason: What happened, e.g. ``"connection refused"``.
    """

    def __init__(self, backend: str, url: str, reason: str) -> None:
        self.backend = backend
        self.url = url
        self.reason = reason
        super().__init__(f"LLM backend {backend!r} at {url} is unavailable: {reason}")


class ContextTooLong(BackendError):
    """The prompt (plus the room reserved for output) exceeds the context window.

    Args:
        prompt_tokens: Tokens in the prompt, when known.
        limit: The context window in tokens, when known.
        detail: The backend's own message, when it reported the error.
    """

    def __init__(
        self, prompt_tokens: int | None, limit: int | None, detail: str | None = None
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.detail = detail
        tokens = "unknown" if prompt_tokens is None else str(prompt_tokens)
        window = "unknown" if limit is None else str(limit)
        message = f"prompt of {tokens} tokens does not fit the context window of {window} tokens"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class BadRequest(BackendError):
    """The backend rejected the request (an HTTP 4xx other than a context overflow)."""
