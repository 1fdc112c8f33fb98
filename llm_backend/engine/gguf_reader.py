"""Read a GGUF file: model metadata, tokenizer metadata, and dequantized tensors.

A layer over a memory-mapped file (the header parsed by ``gguf_header``, which says
why not ``gguf.GGUFReader``) that turns every failure into a ``ModelFileError``
naming the file and the problem, and dequantizes the tensor types the engine
supports to float32 with ``gguf.quants.dequantize``.

Example:
    >>> gguf_file = GGUFFile.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> gguf_file.metadata.architecture, gguf_file.metadata.block_count
    ('llama', 30)
    >>> gguf_file.tensor("blk.0.attn_q.weight").shape  # (out_features, in_features)
    torch.Size([576, 576])
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llm_backend.engine.errors import ModelFileError
from llm_backend.engine.gguf_header import GGUFHeader, HeaderError, TensorInfo, read_header

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TENSOR_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)


@dataclass
class TokenizerMetadata:
    """The ``tokenizer.*`` keys of a GGUF file."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokens: list[str]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    token_types: list[int] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    eot_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None


@dataclass
class GGUFMetadata:
    """Model hyper-parameters read from ``<arch>.*`` keys, plus the tokenizer keys."""

    architecture: str
    name: str
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    rope_freq_base: float
    rope_dimension_count: int | None
    rope_scaling_type: str | None
    rope_scaling_factor: float | None
    rms_norm_eps: float
    vocab_size: int
    tokenizer: TokenizerMetadata
    key_length: int | None = None  # explicit head_dim when it differs from dim / n_heads


def _check_magic(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if not path.is_file():
        raise ModelFileError(path, "not a regular file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


class GGUFFile:
    """An opened GGUF file: ``metadata`` plus lazily dequantized tensors.

    Use ``GGUFFile.open(path)``; it validates the magic, the architecture and every
    tensor's type and byte range up front, so a bad file fails before any weight is
    loaded. The file is memory-mapped; tensors are read only when asked for.
    """

    def __init__(self, path: Path, buffer: mmap.mmap, header: GGUFHeader) -> None:
        self.path = path
        self._buffer = buffer
        self.metadata = _read_metadata(path, header.fields)
        self._tensors = {info.name: info for info in header.tensors}

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open and validate ``path``; raise ``ModelFileError`` on any problem."""
        path = Path(path).expanduser()
        _check_magic(path)
        try:
            with path.open("rb") as handle:
                buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            header = read_header(buffer)
        except (HeaderError, OSError, ValueError) as exc:
            raise ModelFileError(path, f"corrupt or truncated GGUF ({exc})") from exc
        gguf_file = cls(path, buffer, header)
        gguf_file._validate_tensors()
        return gguf_file

    @property
    def tensor_names(self) -> list[str]:
        """Names of all tensors, in file order."""
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        """Whether the file holds a tensor called ``name``."""
        return name in self._tensors

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        """The stored ggml type of tensor ``name``."""
        return GGMLQuantizationType(self._get(name).tensor_type)

    def release_pages(self) -> None:
        """Drop the file's pages read so far from this process's RSS (the mapping stays;
        a later read faults them back in from the page cache). A loader that reads the
        file front to back calls it between blocks, so the whole file is never counted
        on top of the weights built from it."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._buffer.madvise(mmap.MADV_DONTNEED)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape in torch order, without reading its data."""
        return self._get(name).shape

    def tensor_numpy(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to a float32 numpy array in row-major (torch) order."""
        info = self._get(name)
        return _dequantize(info.data(self._buffer), info.tensor_type).reshape(info.shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a float32 torch tensor (a fresh copy, writable)."""
        return _writable_tensor(self.tensor_numpy(name))

    def tensor_row_chunks(self, name: str, rows_per_chunk: int = 4096) -> Iterator[torch.Tensor]:
        """2-D tensor ``name`` as float32 chunks of ``rows_per_chunk`` rows, in order.

        A large matrix (the token embedding) is then never whole in float32: its reader
        quantizes each chunk as it comes.
        """
        info = self._get(name)
        if len(info.shape) != 2:
            raise ModelFileError(self.path, f"tensor {name} is not a matrix: {info.shape}")
        data = info.data(self._buffer)  # (rows, bytes per row) for block types, else values
        for start in range(0, info.shape[0], rows_per_chunk):
            part = _dequantize(data[start : start + rows_per_chunk], info.tensor_type)
            yield _writable_tensor(part.reshape(-1, info.shape[1]))

    def _get(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"missing tensor {name!r}") from None

    def _validate_tensors(self) -> None:
        if not self._tensors:
            raise ModelFileError(self.path, "holds no tensors")
        file_size = len(self._buffer)
        for info in self._tensors.values():
            try:
                qtype = GGMLQuantizationType(info.tensor_type)
            except ValueError:
                raise ModelFileError(
                    self.path, f"tensor {info.name} has unknown ggml type {info.tensor_type}"
                ) from None
            if qtype not in SUPPORTED_TENSOR_TYPES:
                supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
                raise ModelFileError(
                    self.path,
                    f"unsupported tensor type {qtype.name} for {info.name} "
                    f"(supported: {supported})",
                )
            if info.offset + info.n_bytes > file_size:
                raise ModelFileError(
                    self.path,
                    f"truncated: tensor {info.name} ends at byte "
                    f"{info.offset + info.n_bytes}, file has {file_size}",
                )


def _dequantize(data: np.ndarray, tensor_type: int) -> np.ndarray:
    """Raw tensor data (all of it, or a slice of whole rows) as float32."""
    qtype = GGMLQuantizationType(tensor_type)
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.asarray(data, dtype=np.float16).astype(np.float32)
    return dequantize(data, qtype).astype(np.float32, copy=False)


def _writable_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning its float32 data (a view of the mapped file is copied)."""
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array)


def _string_array(fields: dict[str, Any], key: str) -> list[str]:
    value = fields.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key} should hold strings")
    return value


def _number_array(fields: dict[str, Any], key: str) -> list[Any] | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or any(isinstance(item, str) for item in value):
        raise ValueError(f"{key} holds strings, expected numbers")
    return value


def _read_metadata(path: Path, fields: dict[str, Any]) -> GGUFMetadata:
    arch = fields.get("general.architecture")
    if arch is None:
        raise ModelFileError(path, "missing general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            path,
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )

    def required(key: str) -> Any:
        value = fields.get(f"{arch}.{key}")
        if value is None:
            raise ModelFileError(path, f"missing metadata key {arch}.{key}")
        return value

    def optional(key: str) -> Any:
        return fields.get(f"{arch}.{key}")

    tokens = _string_array(fields, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFileError(path, "missing tokenizer.ggml.tokens (no vocabulary)")
    tokenizer = TokenizerMetadata(
        model=fields.get("tokenizer.ggml.model") or "gpt2",
        pre=fields.get("tokenizer.ggml.pre"),
        tokens=tokens,
        merges=_string_array(fields, "tokenizer.ggml.merges"),
        scores=_number_array(fields, "tokenizer.ggml.scores"),
        token_types=_number_array(fields, "tokenizer.ggml.token_type"),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        unk_token_id=fields.get("tokenizer.ggml.unknown_token_id"),
        eot_token_id=fields.get("tokenizer.ggml.eot_token_id"),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token") or False),
        add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token") or False),
        chat_template=fields.get("tokenizer.chat_template"),
    )
    head_count = int(required("attention.head_count"))
    head_count_kv = optional("attention.head_count_kv")
    scaling_type = optional("rope.scaling.type")
    scaling_factor = optional("rope.scaling.factor")
    vocab_size = optional("vocab_size")
    key_length = optional("attention.key_length")
    rope_dims = optional("rope.dimension_count")
    return GGUFMetadata(
        architecture=arch,
        name=fields.get("general.name") or path.stem,
        context_length=int(required("context_length")),
        embedding_length=int(required("embedding_length")),
        block_count=int(required("block_count")),
        feed_forward_length=int(required("feed_forward_length")),
        head_count=head_count,
        head_count_kv=int(head_count_kv) if head_count_kv is not None else head_count,
        rope_freq_base=float(optional("rope.freq_base") or 10000.0),
        rope_dimension_count=int(rope_dims) if rope_dims is not None else None,
        rope_scaling_type=str(scaling_type) if scaling_type else None,
        rope_scaling_factor=float(scaling_factor) if scaling_factor else None,
        rms_norm_eps=float(required("attention.layer_norm_rms_epsilon")),
        vocab_size=int(vocab_size) if vocab_size is not None else len(tokens),
        tokenizer=tokenizer,
        key_length=int(key_length) if key_length is not None else None,
    )
