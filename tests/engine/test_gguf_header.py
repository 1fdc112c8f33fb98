"""The hand-written GGUF header parser against ``gguf.GGUFReader`` on the same files."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from llm_backend.engine.gguf_header import HeaderError, read_header

Q = gguf.GGMLQuantizationType


def _every_value_type(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strings", ["a", "", "Ġthe", "<|im_end|>", "日本"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    weight = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("q8", gguf.quants.quantize(weight, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("q41", gguf.quants.quantize(weight, Q.Q4_1), raw_dtype=Q.Q4_1)
    writer.add_tensor("vec", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _mapped(path: Path) -> mmap.mmap:
    with path.open("rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def test_every_value_type_and_tensor_matches_gguf_reader(tmp_path: Path) -> None:
    path = _every_value_type(tmp_path / "all.gguf")
    buffer = _mapped(path)
    header = read_header(buffer)
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.fields == expected
    assert header.fields["t.u64"] == 2**63 + 5 and header.fields["t.str"] == "héllo ✓"
    assert header.fields["t.strings"][-1] == "日本"
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
        assert ours.shape == tuple(reversed(theirs.shape.tolist()))
        data = ours.data(buffer)
        assert data.dtype == theirs.data.dtype and data.shape == theirs.data.shape
        assert np.array_equal(data, theirs.data)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:3], "truncated"),
        (lambda b: b"GGUF" + (7).to_bytes(4, "little") + b[8:], "unsupported GGUF version 7"),
        (lambda b: b"GGUF" + (3).to_bytes(4, "big") + b[8:], "big-endian"),
        (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    ],
)
def test_malformed_headers_raise_header_errors(
    tmp_path: Path, mangle: Callable[[bytes], bytes], message: str
) -> None:
    data = _every_value_type(tmp_path / "all.gguf").read_bytes()
    with pytest.raises(HeaderError, match=message):
        read_header(mangle(data))


def test_a_cut_inside_the_vocabulary_is_truncation(tmp_path: Path) -> None:
    data = _every_value_type(tmp_path / "all.gguf").read_bytes()
    cut = data.index("Ġthe".encode()) + 2  # in the middle of a string of an array
    with pytest.raises(HeaderError, match="truncated: needs byte"):
        read_header(data[:cut])
