"""GGUF reading: metadata, dequantization of every supported type, and clear file errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llm_backend.engine.errors import EngineError, ModelFileError
from llm_backend.engine.gguf_reader import GGUFFile
from llm_backend.engine.loader import load_model

Q = gguf.GGMLQuantizationType


def _write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    """A llama GGUF holding only ``tensors`` and the minimum metadata our reader needs."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(["a", "b"])
    for name, (array, raw_type) in tensors.items():
        if raw_type is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.integration
def test_smollm2_metadata(smollm2_gguf_path: Path) -> None:
    meta = GGUFFile.open(smollm2_gguf_path).metadata
    assert (meta.architecture, meta.block_count, meta.embedding_length) == ("llama", 30, 576)
    assert (meta.head_count, meta.head_count_kv, meta.feed_forward_length) == (9, 3, 1536)
    assert meta.vocab_size == 49152 and len(meta.tokenizer.tokens) == 49152
    assert meta.rope_freq_base == 100000.0 and meta.context_length == 8192
    assert abs(meta.rms_norm_eps - 1e-5) < 1e-9
    assert meta.tokenizer.model == "gpt2" and len(meta.tokenizer.merges) == 48900
    assert (meta.tokenizer.bos_token_id, meta.tokenizer.eos_token_id) == (1, 2)
    assert meta.tokenizer.chat_template and "<|im_start|>" in meta.tokenizer.chat_template


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_round_trips_within_quantization_error(qtype: Q, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    stored = weight.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(weight, qtype)
    raw = None if qtype == Q.F16 else qtype
    path = _write_tensors(tmp_path / "w.gguf", {"w": (stored, raw)})
    got = GGUFFile.open(path).tensor("w")
    assert got.shape == (8, 64) and got.dtype == torch.float32
    # Worst-case step of each format on N(0, 1) data: 4-bit ~ range/15, 8-bit ~ range/127.
    tolerance = {Q.F16: 1e-3, Q.BF16: 2e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.35, Q.Q4_1: 0.25}[qtype]
    assert float((got - torch.from_numpy(weight)).abs().max()) < tolerance
    # Read in row chunks (how the loader streams the vocab matrix): the same rows.
    chunks = list(GGUFFile.open(path).tensor_row_chunks("w", rows_per_chunk=3))
    assert [c.shape[0] for c in chunks] == [3, 3, 2]
    assert torch.equal(torch.cat(chunks), got)


def test_row_chunks_of_a_vector_is_an_error(tmp_path: Path) -> None:
    path = _write_tensors(tmp_path / "v.gguf", {"v": (np.ones(64, dtype=np.float32), None)})
    with pytest.raises(ModelFileError, match="tensor v is not a matrix"):
        next(GGUFFile.open(path).tensor_row_chunks("v"))


@pytest.mark.parametrize(
    ("qtype", "block_bytes", "half_offsets"),
    [
        (Q.Q4_K, 144, (0, 2)),
        (Q.Q5_K, 176, (0, 2)),
        (Q.Q6_K, 210, (208,)),
    ],
)
def test_k_quants_match_transformers_dequantizer(
    qtype: Q, block_bytes: int, half_offsets: tuple[int, ...], tmp_path: Path
) -> None:
    """Random K-quant blocks (sane fp16 scales) decode like transformers' own torch decoder."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, blocks_per_row = 4, 2  # each block holds 256 values
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in half_offsets:
        scale = rng.uniform(0.001, 0.02, size=rows * blocks_per_row).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    data = raw.reshape(rows, blocks_per_row * block_bytes)
    path = _write_tensors(tmp_path / "k.gguf", {"w": (data, qtype)})
    got = GGUFFile.open(path).tensor("w")
    assert got.shape == (rows, 256 * blocks_per_row)
    expected = hf_dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).reshape(got.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nope\.gguf: no such file"):
        load_model(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>" * 10)
    with pytest.raises(ModelFileError, match=r"junk\.gguf: not a GGUF file"):
        load_model(junk)


@pytest.mark.parametrize("keep_fraction", [0.02, 0.6, 0.999])
def test_truncated_file(
    keep_fraction: float, tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    data = tiny_gguf().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelFileError, match=r"cut\.gguf: .*(truncated|corrupt)"):
        load_model(cut, quant="fp32")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match=r"mamba\.gguf: unsupported architecture 'mamba'"):
        load_model(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    weight = np.ones((4, 64), dtype=np.float32)
    path = _write_tensors(
        tmp_path / "q5.gguf", {"w": (gguf.quants.quantize(weight, Q.Q5_0), Q.Q5_0)}
    )
    with pytest.raises(ModelFileError, match=r"q5\.gguf: unsupported tensor type Q5_0 for w"):
        GGUFFile.open(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = _write_tensors(
        tmp_path / "few.gguf", {"token_embd.weight": (np.ones((2, 32), np.float32), None)}
    )
    with pytest.raises(ModelFileError, match=r"few\.gguf: missing tensor 'blk\.0\.attn_q\.weight'"):
        load_model(path, quant="fp32")


def test_bad_quant_mode(tiny_gguf: Callable[..., Path]) -> None:
    with pytest.raises(
        EngineError, match="quant must be one of auto, fp32, bf16, fp16, int8, int4, got 'int2'"
    ):
        load_model(tiny_gguf(), quant="int2")
