"""The llm_backend exception family.

Every backend raises these (never a client library's own exceptions), so the
layers above handle one small set:

- ``BackendUnavailable``: the backend cannot be reached, or did not answer in time.
- ``ContextTooLong``: the prompt does not fit the model's context window.
- ``BadRequest``: the backend refused the request as malformed (a 4xx).
- ``BackendError``: the base class, and anything else that went wrong.
"""

from __future__ import annotations

import re

# vLLM and our engine: "This model's maximum context length is 2048 tokens. However, you
# requested 2100 tokens (2000 in the messages, 100 in the completion)." / "...However,
# your prompt has 3031 tokens."
_LIMIT = re.compile(r"maximum context length is (\d+)", re.IGNORECASE)
_PROMPT = re.compile(
    r"\((\d+) in the (?:messages|prompt)|prompt (?:contains|has) (\d+)", re.IGNORECASE
)


def _first_int(match: re.Match[str] | None) -> int | None:
    if match is None:
        return None
    return next((int(group) for group in match.groups() if group), None)


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

    @classmethod
    def from_server_message(cls, detail: str, default_limit: int | None) -> ContextTooLong:
        """Read the prompt size and limit out of a server's context-length error message."""
        limit = _first_int(_LIMIT.search(detail))
        return cls(_first_int(_PROMPT.search(detail)), limit or default_limit, detail)


class BadRequest(BackendError):
    """The backend rejected the request (an HTTP 4xx other than a context overflow)."""
