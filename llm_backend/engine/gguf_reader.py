"""Read a GGUF file: model metadata, tokenizer metadata, and dequantized tensors.

A thin layer over ``gguf.GGUFReader`` (memory-mapped) that turns every failure
into a ``ModelFileError`` naming the file and the problem, and dequantizes the
tensor types the engine supports to float32 with ``gguf.quants.dequantize``.

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
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llm_backend.engine.errors import ModelFileError

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
    loaded.
    """

    def __init__(self, path: Path, reader: GGUFReader, metadata: GGUFMetadata) -> None:
        self.path = path
        self._reader = reader
        self.metadata = metadata
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open and validate ``path``; raise ``ModelFileError`` on any problem."""
        path = Path(path).expanduser()
        _check_magic(path)
        try:
            reader = GGUFReader(path, "r")
        except (ValueError, IndexError, OSError, KeyError, TypeError, AssertionError) as exc:
            # GGUFReader raises these on truncated or corrupt headers / tensor data.
            raise ModelFileError(path, f"corrupt or truncated GGUF ({exc})") from exc
        metadata = _read_metadata(path, reader)
        # The parsed key/value fields (one small numpy array per token string) are no
        # longer needed: free them now so the weights can reuse that heap.
        reader.fields.clear()
        gguf_file = cls(path, reader, metadata)
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
        mapping = self._reader.data.base
        if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape in torch order, without reading its data."""
        return _torch_shape(self._get(name))

    def tensor_numpy(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to a float32 numpy array in row-major (torch) order."""
        tensor = self._get(name)
        return _dequantize(tensor.data, tensor.tensor_type).reshape(_torch_shape(tensor))

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a float32 torch tensor (a fresh copy, writable)."""
        return _writable_tensor(self.tensor_numpy(name))

    def tensor_row_chunks(self, name: str, rows_per_chunk: int = 4096) -> Iterator[torch.Tensor]:
        """2-D tensor ``name`` as float32 chunks of ``rows_per_chunk`` rows, in order.

        A large matrix (the token embedding) is then never whole in float32: its reader
        quantizes each chunk as it comes.
        """
        tensor = self._get(name)
        shape = _torch_shape(tensor)
        data = tensor.data  # (rows, bytes per row) for block types, (rows, cols) for floats
        if len(shape) != 2 or data.shape[0] != shape[0]:
            raise ModelFileError(self.path, f"tensor {name} is not a matrix: {shape}")
        for start in range(0, shape[0], rows_per_chunk):
            part = _dequantize(data[start : start + rows_per_chunk], tensor.tensor_type)
            yield _writable_tensor(part.reshape(-1, shape[1]))

    def _get(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"missing tensor {name!r}") from None

    def _validate_tensors(self) -> None:
        if not self._tensors:
            raise ModelFileError(self.path, "holds no tensors")
        file_size = self.path.stat().st_size
        for tensor in self._reader.tensors:
            try:
                qtype = GGMLQuantizationType(tensor.tensor_type)
            except ValueError:
                raise ModelFileError(
                    self.path, f"tensor {tensor.name} has unknown ggml type {tensor.tensor_type}"
                ) from None
            if qtype not in SUPPORTED_TENSOR_TYPES:
                supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
                raise ModelFileError(
                    self.path,
                    f"unsupported tensor type {qtype.name} for {tensor.name} "
                    f"(supported: {supported})",
                )
            if tensor.data_offset + tensor.n_bytes > file_size:
                raise ModelFileError(
                    self.path,
                    f"truncated: tensor {tensor.name} ends at byte "
                    f"{tensor.data_offset + tensor.n_bytes}, file has {file_size}",
                )


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    """A reader tensor's shape in torch order (ggml's ne is fastest-first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


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


def _field_value(reader: GGUFReader, key: str) -> Any:
    """A scalar or string field's value, or None when the key is absent."""
    reader_field = reader.fields.get(key)
    if reader_field is None:
        return None
    return reader_field.contents()


def _string_array(reader: GGUFReader, key: str) -> list[str]:
    reader_field = reader.fields.get(key)
    if reader_field is None:
        return []
    # Fast path: each element is one part holding the UTF-8 bytes of a string.
    return [bytes(reader_field.parts[i]).decode("utf-8") for i in reader_field.data]


def _number_array(reader: GGUFReader, key: str) -> list[Any] | None:
    reader_field = reader.fields.get(key)
    if reader_field is None:
        return None
    if reader_field.types[-1] == GGUFValueType.STRING:
        raise ValueError(f"{key} holds strings, expected numbers")
    return [reader_field.parts[i][0].item() for i in reader_field.data]


def _read_metadata(path: Path, reader: GGUFReader) -> GGUFMetadata:
    arch = _field_value(reader, "general.architecture")
    if arch is None:
        raise ModelFileError(path, "missing general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(
            path,
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )

    def required(key: str) -> Any:
        value = _field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFileError(path, f"missing metadata key {arch}.{key}")
        return value

    def optional(key: str) -> Any:
        return _field_value(reader, f"{arch}.{key}")

    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFileError(path, "missing tokenizer.ggml.tokens (no vocabulary)")
    tokenizer = TokenizerMetadata(
        model=_field_value(reader, "tokenizer.ggml.model") or "gpt2",
        pre=_field_value(reader, "tokenizer.ggml.pre"),
        tokens=tokens,
        merges=_string_array(reader, "tokenizer.ggml.merges"),
        scores=_number_array(reader, "tokenizer.ggml.scores"),
        token_types=_number_array(reader, "tokenizer.ggml.token_type"),
        bos_token_id=_field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field_value(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field_value(reader, "tokenizer.ggml.unknown_token_id"),
        eot_token_id=_field_value(reader, "tokenizer.ggml.eot_token_id"),
        add_bos_token=bool(_field_value(reader, "tokenizer.ggml.add_bos_token") or False),
        add_eos_token=bool(_field_value(reader, "tokenizer.ggml.add_eos_token") or False),
        chat_template=_field_value(reader, "tokenizer.chat_template"),
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
        name=_field_value(reader, "general.name") or path.stem,
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
