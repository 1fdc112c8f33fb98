"""Retriever configurations for an evaluation run: ``NAME=MODE[,key=value...]``.

Examples::

    bm25=bm25
    dense=dense,k=100
    hyb=hybrid,bm25_weight=0.6,dense_weight=0.4
    hyb_rr=hybrid,rerank=true,rerank_top=50
    small=dense,chunk_size=128,chunk_overlap=16

``chunk_size``, ``chunk_overlap`` and ``embedding_model`` decide which index a
configuration runs on (see :attr:`RetrieverConfig.index_params`); the others only
change how that index is queried.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from eval.errors import ConfigError, EvalError
from eval.results import check_config_name

Mode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[str, ...] = ("bm25", "dense", "hybrid")
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_RERANKER_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class IndexParams:
    """What an index depends on besides the corpus: same params, same index."""

    chunk_size: int
    chunk_overlap: int
    embedding_model: str


@dataclass(frozen=True, slots=True)
class RetrieverConfig:
    """One retriever configuration to evaluate.

    Attributes:
        name: Label in reports and file names.
        mode: ``bm25``, ``dense`` or ``hybrid``.
        k: Documents per query kept in the run (recall@100 needs k >= 100).
        fetch_k: Chunks fetched per query before mapping chunks to documents;
            several chunks of one document collapse into one, so keep it above k.
        dense_weight: Weight of the dense ranking in hybrid fusion.
        bm25_weight: Weight of the BM25 ranking in hybrid fusion.
        rerank: Rerank the fetched chunks with a cross-encoder.
        reranker_model: The cross-encoder (a local folder or a name).
        rerank_top: How many fetched chunks the cross-encoder rescores.
        chunk_size: Tokens per chunk of the index.
        chunk_overlap: Overlapping tokens between chunks of the index.
        embedding_model: Embedding model of the index.
    """

    name: str
    mode: Mode
    k: int = 100
    fetch_k: int = 200
    dense_weight: float = 0.5
    bm25_weight: float = 0.5
    rerank: bool = False
    reranker_model: str = DEFAULT_RERANKER_MODEL
    rerank_top: int = 100
    chunk_size: int = 256
    chunk_overlap: int = 32
    embedding_model: str = DEFAULT_EMBEDDING_MODEL

    def __post_init__(self) -> None:
        try:
            check_config_name(self.name)
        except EvalError as exc:
            raise ConfigError(str(exc)) from exc
        if self.mode not in MODES:
            raise ConfigError(
                f"{self.name}: mode must be one of {', '.join(MODES)}, got {self.mode!r}"
            )
        for key in ("k", "fetch_k", "rerank_top", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{self.name}: {key} must be >= 1, got {getattr(self, key)}")
        if self.fetch_k < self.k:
            raise ConfigError(
                f"{self.name}: fetch_k ({self.fetch_k}) must be >= k ({self.k}): "
                "chunks are fetched first, then grouped into documents"
            )
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ConfigError(
                f"{self.name}: chunk_overlap must be in [0, chunk_size), got {self.chunk_overlap}"
            )
        for key in ("dense_weight", "bm25_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{self.name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.mode == "hybrid" and self.dense_weight + self.bm25_weight <= 0:
            raise ConfigError(f"{self.name}: hybrid needs dense_weight + bm25_weight > 0")

    @property
    def index_params(self) -> IndexParams:
        """The part of the configuration that decides the index."""
        return IndexParams(self.chunk_size, self.chunk_overlap, self.embedding_model)

    def spec(self) -> dict[str, Any]:
        """The parameters for reports: the mode and whatever differs from the defaults."""
        defaults = RetrieverConfig(name="x", mode=self.mode)
        out: dict[str, Any] = {"mode": self.mode}
        for key, value in asdict(self).items():
            if key in ("name", "mode"):
                continue
            if key == "reranker_model" and not self.rerank:
                continue
            if key in ("dense_weight", "bm25_weight") and self.mode != "hybrid":
                continue
            if value != getattr(defaults, key) or key == "k":
                out[key] = value
        return out


_FIELD_TYPES = {f.name: f.type for f in fields(RetrieverConfig)}
_SETTABLE = sorted(k for k in _FIELD_TYPES if k not in ("name", "mode"))
_ALIASES = {"top_k": "k", "weight_bm25": "bm25_weight", "weight_dense": "dense_weight"}


def _convert(name: str, key: str, raw: str) -> Any:
    kind = str(_FIELD_TYPES[key])
    if kind == "bool":
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name}: {key} must be true or false, got {raw!r}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {key} must be a whole number, got {raw!r}") from exc
    if kind == "float":
        try:
            return float(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: {key} must be a number, got {raw!r}") from exc
    if not raw:
        raise ConfigError(f"{name}: {key} must not be empty")
    return raw


def parse_config(text: str, defaults: dict[str, Any] | None = None) -> RetrieverConfig:
    """Parse ``NAME=MODE[,key=value...]`` into a :class:`RetrieverConfig`.

    Args:
        text: The configuration string from the command line.
        defaults: Values used where the string sets nothing (e.g. the CLI's
            ``--chunk-size``); keys as in :class:`RetrieverConfig`.

    Raises:
        ConfigError: bad shape, unknown mode or key, a value of the wrong type,
            or an inconsistent combination (the message says which).
    """
    head, _, rest = text.partition(",")
    name, eq, mode = head.partition("=")
    name, mode = name.strip(), mode.strip().lower()
    if not eq or not name or not mode:
        raise ConfigError(
            f"configuration {text!r} must look like NAME=MODE[,key=value...], "
            "e.g. hyb=hybrid,bm25_weight=0.6"
        )
    if mode not in MODES:
        raise ConfigError(f"{name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    values: dict[str, Any] = dict(defaults or {})
    seen: set[str] = set()
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = part.partition("=")
        key = _ALIASES.get(key.strip().lower(), key.strip().lower())
        if not eq:
            raise ConfigError(f"{name}: option {part!r} must look like key=value")
        if key not in _SETTABLE:
            raise ConfigError(f"{name}: unknown option {key!r}; known: {', '.join(_SETTABLE)}")
        if key in seen:
            raise ConfigError(f"{name}: option {key!r} is given twice")
        seen.add(key)
        values[key] = _convert(name, key, raw.strip())
    if "k" in seen and "fetch_k" not in seen:
        values["fetch_k"] = max(int(values.get("fetch_k", 200)), 2 * int(values["k"]))
    try:
        return RetrieverConfig(name=name, mode=mode, **values)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def check_unique(configs: list[RetrieverConfig]) -> list[RetrieverConfig]:
    """Refuse an empty list or two configurations with the same name."""
    if not configs:
        raise ConfigError("give at least one configuration, e.g. --config bm25=bm25")
    seen: set[str] = set()
    for config in configs:
        if config.name in seen:
            raise ConfigError(f"configuration name {config.name!r} is used twice")
        seen.add(config.name)
    return configs
