"""Decode steps compiled ahead of time (``llm_backend.engine.aot``) against eager ones."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_backend.engine import aot
from llm_backend.engine.errors import EngineError
from llm_backend.engine.loader import load_model
from llm_backend.engine.quantize import Int8Linear

pytestmark = pytest.mark.slow


@torch.inference_mode()
def test_aot_decode_matches_eager_writes_the_models_cache_and_is_reused(
    tiny_gguf: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_gguf()
    aot_dir = tmp_path / "aot"
    eager = load_model(path, quant="fp32", max_batch=4, max_seq_len=64).model
    model = load_model(
        path, quant="fp32", max_batch=4, max_seq_len=64, compile_decode=True, aot_dir=aot_dir
    ).model
    decode = model._aot_decode
    assert decode is not None and model._compiled_run is None  # no in-process compiler
    torch.manual_seed(0)
    prompts = [torch.randint(0, 200, (1, n)) for n in (5, 9, 3)]
    slots = torch.tensor([2, 0, 3])  # rows in other slots than their index: gather path
    for net in (eager, model):
        for slot, prompt in zip(slots.tolist(), prompts, strict=True):
            positions = torch.arange(prompt.shape[1])[None]
            net(prompt, positions, torch.tensor([slot]), kv_len=prompt.shape[1])  # prefill
    assert decode.calls == 0  # prefill stays eager
    positions = torch.tensor([[5], [9], [3]])
    tokens = torch.tensor([[7], [8], [9]])
    for _ in range(4):  # kv_len and positions change every step: one library serves all
        kv_len = int(positions.max()) + 1
        want = eager(tokens, positions, slots, kv_len=kv_len)  # (3, 1, V)
        got = model(tokens, positions, slots, kv_len=kv_len)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = want[:, -1].argmax(-1, keepdim=True)
        positions = positions + 1
    assert decode.calls == 4
    # the compiled steps wrote their K/V into the model's own cache
    for mine, theirs in zip(model.blocks(), eager.blocks(), strict=True):
        assert mine.attention.kv_cache is not None and theirs.attention.kv_cache is not None
        torch.testing.assert_close(
            mine.attention.kv_cache.k_cache, theirs.attention.kv_cache.k_cache, atol=1e-5, rtol=0
        )
    # a single row without slots (generate's path) and a batch of every slot
    single = (torch.tensor([[11]]), torch.tensor([[13]]))
    torch.testing.assert_close(
        model(*single, kv_len=14), eager(*single, kv_len=14), atol=1e-4, rtol=1e-4
    )
    assert decode.calls == 5

    # A second load finds the library in the cache: no child process.
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached decode step")

    monkeypatch.setattr(subprocess, "run", no_build)
    again = load_model(
        path, quant="fp32", max_batch=4, max_seq_len=64, compile_decode=True, aot_dir=aot_dir
    ).model
    assert again._aot_decode is not None
    # Reallocating the cache drops the library (it holds the old cache's pointers).
    again.setup_caches(2, 32, torch.float32)
    assert again._aot_decode is None
    # A folder built for other cache sizes is refused with a clear error.
    (folder,) = [p for p in aot_dir.iterdir() if not p.name.startswith(".")]
    with pytest.raises(EngineError, match="compiled for 4 slots x 64 positions"):
        aot.AotDecode.load(folder, again)
    manifest = json.loads((folder / aot.MANIFEST).read_text())
    name = next(iter(manifest["constants"]))
    manifest["constants"][name]["shape"] = [1, 2, 3]
    (folder / aot.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="does not match the model"):
        aot.AotDecode.load(folder, eager)


def test_batch_ranges_split_where_a_quantized_linear_switches_path(
    tiny_gguf: Callable[..., Path],
) -> None:
    int8 = load_model(tiny_gguf(), quant="int8", max_batch=40, max_seq_len=32).model
    assert isinstance(int8.output, Int8Linear)
    linears = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    if all(m.bf16_dot for m in linears):  # ragloom's kernel: no switch below 128 rows
        assert aot.decode_batch_ranges(int8) == [(1, 40)]
    for linear in linears:  # PyTorch's int8 kernel goes dense at 32 rows
        linear.bf16_dot = False
    cut = int8.output.dense_from_rows(int8.dtype)
    assert cut is not None and 1 < cut <= 40
    assert aot.decode_batch_ranges(int8) == [(1, cut - 1), (cut, 40)]
    fp32 = load_model(tiny_gguf(), quant="fp32", max_batch=40, max_seq_len=32).model
    assert aot.decode_batch_ranges(fp32) == [(1, 40)]


def test_a_failing_build_is_one_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF nonsense")
    # a build abandoned long ago (its server killed) is cleared; a recent one is left
    abandoned, recent = tmp_path / "aot" / ".build-old", tmp_path / "aot" / ".build-new"
    for folder in (abandoned, recent):
        folder.mkdir(parents=True)
    os.utime(abandoned, (0, 0))
    with pytest.raises(EngineError, match="building the compiled decode step failed"):
        aot.build_decode_packages(
            bogus, quant="fp32", max_batch=2, max_seq_len=16, aot_dir=tmp_path / "aot"
        )
    assert not abandoned.exists() and recent.exists()
    recent.rmdir()
    with pytest.raises(EngineError, match="building the compiled decode step failed"):
        aot.build_decode_packages(
            bogus, quant="fp32", max_batch=2, max_seq_len=16, aot_dir=tmp_path / "aot"
        )
    assert not [p for p in (tmp_path / "aot").iterdir()]  # no half-built folder left


@torch.inference_mode()
def test_background_build_serves_eagerly_then_switches(
    tiny_gguf: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tiny_gguf()
    aot_dir = tmp_path / "aot"
    commands: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(command: list[str], **kwargs: Any) -> Any:
        commands.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    eager = load_model(path, quant="fp32", max_batch=2, max_seq_len=32).model
    loaded = load_model(
        path, quant="fp32", max_batch=2, max_seq_len=32, compile_decode="background",
        aot_dir=aot_dir,
    )  # fmt: skip
    model, build = loaded.model, loaded.decode_build
    assert build is not None and build.is_alive()  # returned before the build is done
    assert model._aot_decode is None and model._compiled_run is None

    def decode_steps(net: torch.nn.Module, start: int) -> torch.Tensor:
        logits = [
            net(torch.tensor([[t % 50]]), torch.tensor([[t]]), torch.tensor([1]), kv_len=t + 1)
            for t in range(start, start + 3)
        ]
        return torch.cat(logits, dim=1)

    for net in (eager, model):
        net(torch.arange(6)[None], torch.arange(6)[None], torch.tensor([1]), kv_len=6)
    torch.testing.assert_close(decode_steps(model, 6), decode_steps(eager, 6))  # eager steps
    build.join(timeout=900)
    assert not build.is_alive()
    decode = model._aot_decode
    assert decode is not None and decode.calls == 0
    got, want = decode_steps(model, 9), decode_steps(eager, 9)
    assert decode.calls == 3  # the same model now decodes through the compiled step
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    (command,) = commands  # one child, told to yield the CPU to this process
    assert f"--background-of={os.getpid()}" in command

    # Cached: the next start loads it at once, no thread.
    again = load_model(
        path, quant="fp32", max_batch=2, max_seq_len=32, compile_decode="background",
        aot_dir=aot_dir,
    )  # fmt: skip
    assert again.decode_build is None and again.model._aot_decode is not None
    assert len(commands) == 1
    # A build that fails leaves decode eager, with a warning naming why.
    caplog.set_level(logging.WARNING, logger="llm_backend.engine.loader")
    short = load_model(
        path, quant="fp32", max_batch=2, max_seq_len=3, compile_decode="background",
        aot_dir=aot_dir,
    )  # fmt: skip
    assert short.decode_build is not None
    short.decode_build.join(timeout=60)
    assert short.model._aot_decode is None
    assert "compiled decode unavailable" in caplog.text and "max_seq_len >= 4" in caplog.text


@torch.inference_mode()
def test_smollm2_int4_compiled_ahead_of_time_decodes_as_eager(
    smollm2_gguf_path: Path, tmp_path: Path
) -> None:
    """The real model's compiled step (int4 kernels, the decode attention kernel and the
    vocab projection's int8 limbs kernel inside one library) gives eager's greedy tokens
    for two rows decoded together."""
    compiled = load_model(
        smollm2_gguf_path,
        quant="int4",
        max_batch=2,
        max_seq_len=256,
        compile_decode=True,
        aot_dir=tmp_path / "aot",
    )
    eager = load_model(smollm2_gguf_path, quant="int4", max_batch=2, max_seq_len=256)
    decode = compiled.model._aot_decode
    assert decode is not None
    (folder,) = [p for p in (tmp_path / "aot").iterdir() if not p.name.startswith(".")]
    constants = json.loads((folder / aot.MANIFEST).read_text())["constants"]
    assert "model.output.code_sums" in constants  # the vocab projection runs our kernel
    tok = compiled.tokenizer
    prompts = [
        tok.encode("The capital of France is"),
        tok.encode('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ]
    runs = []
    for model in (compiled.model, eager.model):
        for slot, ids in enumerate(prompts):
            prefix = torch.tensor([ids[:-1]])
            model.fill_cache(prefix, torch.arange(len(ids) - 1)[None], torch.tensor([slot]))
        tokens = torch.tensor([[ids[-1]] for ids in prompts])  # (2, 1)
        positions = torch.tensor([[len(ids) - 1] for ids in prompts])
        steps = []
        for _ in range(24):
            logits = model(tokens, positions, kv_len=int(positions.max()) + 1)[:, -1]  # (2, V)
            tokens = logits.argmax(-1, keepdim=True)
            positions = positions + 1
            steps.append((tokens[:, 0].tolist(), logits))
        runs.append(steps)
    assert decode.calls == 24
    (aot_steps, eager_steps) = runs
    assert [t for t, _ in aot_steps] == [t for t, _ in eager_steps]
    assert "Paris" in tok.decode([t[0] for t, _ in aot_steps])
    for (_, got), (_, want) in zip(aot_steps, eager_steps, strict=True):
        torch.testing.assert_close(got, want, atol=0.75, rtol=0.0)
