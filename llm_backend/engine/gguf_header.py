"""A GGUF header parser that builds only the values it returns.

``gguf.GGUFReader`` parses every metadata value into numpy views, three per string of
an array: SmolLM2's 49,152-token vocabulary and 48,900 merges make ~300,000 of them.
Loading SmolLM2 that way peaked 170 MiB above the process and left 90 MiB of Python
arenas pinned for good (a few hundred objects that outlive the parse, spread over
them). Here one pass over the memory-mapped header yields plain Python values (a
vocabulary is a ``list[str]``), and each tensor's data stays a numpy view of the map
until it is dequantized (with ``gguf.quants``, whose block sizes this uses too).

Layout (GGUF v2 / v3, little-endian): magic, version u32, tensor count u64, key/value
count u64; each key/value (string key, u32 type, value; an array is u32 element type,
u64 count, elements); each tensor info (string name, u32 dims, u64 sizes fastest
first, u32 ggml type, u64 offset); data from the next multiple of
``general.alignment`` (default 32).

Example:
    >>> header = read_header(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    >>> header.fields["general.architecture"]
    'llama'
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

# Scalar value types: struct format (little-endian).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TYPES = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_SCALARS = {int(t): struct.Struct(fmt) for t, fmt in _SCALAR_FORMATS.items()}
_ARRAY_DTYPES = {int(t): np.dtype(code) for t, code in _NUMPY_TYPES.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
DEFAULT_ALIGNMENT = 32


class HeaderError(ValueError):
    """The header is truncated or malformed (the caller names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: name, ggml type, torch-order shape and where its bytes are."""

    name: str
    tensor_type: int  # a GGMLQuantizationType value (validated by the caller)
    shape: tuple[int, ...]  # torch order: slowest dimension first
    offset: int  # absolute file offset of the first byte
    n_bytes: int

    def data(self, buffer: mmap.mmap) -> np.ndarray:
        """The tensor's bytes as a numpy view: float32 / float16 values in ``shape`` for
        F32 / F16, else uint8 rows of (rows, bytes per row) as ``gguf.quants`` expects."""
        qtype = GGMLQuantizationType(self.tensor_type)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            count = self.n_bytes // np.dtype(dtype).itemsize
            return np.frombuffer(buffer, dtype, count, self.offset).reshape(self.shape)
        raw = np.frombuffer(buffer, np.uint8, self.n_bytes, self.offset)
        return raw.reshape(*self.shape[:-1], -1)


@dataclass(frozen=True)
class GGUFHeader:
    """Every key/value (plain Python values; arrays as lists) and tensor entry."""

    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """Reads little-endian values from ``buffer`` at a moving position, bounds-checked."""

    def __init__(self, buffer: mmap.mmap | bytes, position: int = 0) -> None:
        self.buffer = memoryview(buffer)
        self.position = position

    def take(self, n_bytes: int) -> memoryview:
        end = self.position + n_bytes
        if n_bytes < 0 or end > len(self.buffer):
            raise HeaderError(f"truncated: needs byte {end}, file has {len(self.buffer)}")
        view = self.buffer[self.position : end]
        self.position = end
        return view

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack(self.take(fmt.size))[0]

    def string(self) -> str:
        raw = self.take(self.unpack(_U64))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise HeaderError(f"string at byte {self.position - len(raw)} is not UTF-8") from exc

    def value(self, value_type: int) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALARS.get(value_type)
        if fmt is None:
            raise HeaderError(f"unknown value type {value_type}")
        return self.unpack(fmt)

    def array(self) -> list[Any]:
        element_type = self.unpack(_U32)
        count = self.unpack(_U64)
        if element_type == GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        if element_type == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        dtype = _ARRAY_DTYPES.get(element_type)
        if dtype is None:
            raise HeaderError(f"unknown array element type {element_type}")
        raw = self.take(count * dtype.itemsize)
        return np.frombuffer(raw, dtype, count).tolist()


def read_header(buffer: mmap.mmap | bytes) -> GGUFHeader:
    """Parse a GGUF file's header from its bytes (a read-only ``mmap`` of the file).

    Raises:
        HeaderError: Not GGUF v2 / v3 little-endian, truncated, or malformed.
    """
    cursor = _Cursor(buffer)
    if bytes(cursor.take(4)) != b"GGUF":
        raise HeaderError("not a GGUF file")
    version = cursor.unpack(_U32)
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (2, 3):
            raise HeaderError("big-endian GGUF files are not supported")
        raise HeaderError(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = cursor.unpack(_U64)
    field_count = cursor.unpack(_U64)
    fields: dict[str, Any] = {}
    for _ in range(field_count):
        key = cursor.string()
        fields[key] = cursor.value(cursor.unpack(_U32))
    entries = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.unpack(_U32)
        if n_dims > 8:
            raise HeaderError(f"tensor {name} claims {n_dims} dimensions")
        dims = [cursor.unpack(_U64) for _ in range(n_dims)]
        entries.append((name, dims, cursor.unpack(_U32), cursor.unpack(_U64)))
    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"general.alignment {alignment} is not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    tensors = [
        _tensor_info(name, dims, tensor_type, data_start + offset)
        for name, dims, tensor_type, offset in entries
    ]
    return GGUFHeader(version, fields, tensors)


def _tensor_info(name: str, dims: list[int], tensor_type: int, offset: int) -> TensorInfo:
    """The entry with its byte size; an unknown type gets size 0 (the caller rejects it)."""
    shape = tuple(reversed(dims))  # ggml lists the fastest dimension first
    n_elements = int(np.prod(dims)) if dims else 1
    try:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        return TensorInfo(name, tensor_type, shape, offset, 0)
    if dims and dims[0] % block_size:
        raise HeaderError(f"tensor {name}: row of {dims[0]} is not whole {block_size}-blocks")
    return TensorInfo(name, tensor_type, shape, offset, n_elements // block_size * block_bytes)
