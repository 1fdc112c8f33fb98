"""Pydantic models at the HTTP edge, in families (``XCreate``, ``XPublic``, ``XsPublic``).

Sampling fields carry OpenAI's names (``top_k``, ``min_p`` and ``repetition_penalty``
vLLM's); ``finish_reason`` is ``stop | length | tool_calls``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ChatMode = Literal["rag", "agent", "llm"]
SearchMode = Literal["hybrid", "dense", "bm25"]
FilterValue = str | int | float | bool


class Sampling(BaseModel):
    """How to sample the answer (unset fields keep the server defaults)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="0 disables it.")
    min_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description="1 = off; default: the server's agent setting."
    )
    stop: list[str] | None = Field(default=None, max_length=8)


class ChatIn(BaseModel):
    """``POST /api/chat``."""

    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(default=None, max_length=64)
    message: str = Field(min_length=1)
    collection: str | None = Field(default=None, max_length=64)
    mode: ChatMode = "rag"
    stream: bool = True
    k: int | None = Field(default=None, ge=1, le=50)
    sampling: Sampling = Field(default_factory=Sampling)


class CitationPublic(BaseModel):
    """A checked ``[n]`` citation of a retrieved chunk."""

    number: int
    doc_id: str
    chunk_id: str
    source: str
    title: str
    page: int | None = None
    section: str | None = None
    snippet: str
    score: float | None = None


class ToolCallPublic(BaseModel):
    """One tool call of an agent run and its result."""

    id: str
    name: str
    arguments: dict[str, Any]
    result: str | None = None
    error: bool = False


class UsagePublic(BaseModel):
    """Token counts reported by the backend."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatOut(BaseModel):
    """A complete chat answer (also the data of the SSE ``done`` event)."""

    session_id: str
    mode: ChatMode
    answer: str
    citations: list[CitationPublic]
    tool_calls: list[ToolCallPublic]
    usage: UsagePublic | None
    timings: dict[str, float | None]
    refused: bool = False
    finish_reason: str | None = None


class MessagePublic(BaseModel):
    """A stored turn of a session."""

    role: str
    content: str
    citations: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    created_at: float


class SessionPublic(BaseModel):
    """A session as listed."""

    id: str
    title: str
    collection: str | None
    mode: str
    created_at: float
    updated_at: float


class SessionDetail(SessionPublic):
    """A session with its messages."""

    messages: list[MessagePublic]


class SessionsPublic(BaseModel):
    """``GET /api/sessions``."""

    data: list[SessionPublic]


class CollectionCreate(BaseModel):
    """``POST /api/collections``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)


class CollectionPublic(BaseModel):
    """A collection of the caller's tenant."""

    name: str
    documents: int
    chunks: int
    embedding_model: str


class CollectionsPublic(BaseModel):
    """``GET /api/collections``."""

    data: list[CollectionPublic]


class DocumentPublic(BaseModel):
    """A committed document."""

    doc_id: str
    source: str
    title: str
    chunks: int


class DocumentsPublic(BaseModel):
    """``GET /api/collections/{name}/documents``."""

    data: list[DocumentPublic]


class FileResultPublic(BaseModel):
    """What happened to one uploaded file."""

    filename: str
    status: str
    documents: int = 0
    chunks: int = 0
    error: str | None = None


class JobPublic(BaseModel):
    """An ingestion job: ``queued | running | succeeded | failed`` (some files may fail)."""

    id: str
    collection: str
    status: str
    total_files: int
    processed_files: int
    chunks_added: int
    files: list[FileResultPublic]
    error: str | None
    created_at: float
    finished_at: float | None


class SearchIn(BaseModel):
    """``POST /api/search``: retrieval only."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4000)
    collection: str = Field(min_length=1, max_length=64)
    k: int = Field(default=5, ge=1, le=50)
    mode: SearchMode = "hybrid"
    filters: dict[str, FilterValue] | None = None


class SearchHit(BaseModel):
    """One retrieved chunk."""

    rank: int
    score: float
    dense_score: float | None
    bm25_score: float | None
    chunk_id: str
    doc_id: str
    text: str
    metadata: dict[str, Any]


class SearchOut(BaseModel):
    """``POST /api/search`` result."""

    results: list[SearchHit]


# -- OpenAI-compatible -----------------------------------------------------------


class OpenAIMessage(BaseModel):
    """A chat message in OpenAI's wire shape (text content or text parts)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatCompletionIn(BaseModel):
    """``POST /v1/chat/completions`` (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    top_k: int | None = Field(default=None, ge=0, description="Extra body field (vLLM's).")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Extra body field.")
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description="Extra body field."
    )
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    collection: str | None = Field(default=None, max_length=64)
    k: int | None = Field(default=None, ge=1, le=50)


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ragloom"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
