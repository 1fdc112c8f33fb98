"""torch.compile'd decode steps (``load_model(compile_decode=True)``) against eager ones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from llm_backend.engine.loader import load_model
from llm_backend.engine.model import SMALL_T_ATTENTION

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("quant", ["fp16"])  # fp16: fbgemm through a custom op, in-process
@torch.inference_mode()
def test_compiled_decode_matches_eager_for_batched_rows_at_different_positions(
    quant: str, tiny_gguf: Callable[..., Path]
) -> None:
    path = tiny_gguf()
    eager = load_model(path, quant=quant, max_batch=4, max_seq_len=64).model
    breaks = sum(counters["graph_break"].values())
    compiled = load_model(path, quant=quant, max_batch=4, max_seq_len=64, compile_decode=True)
    model = compiled.model
    assert model._compiled_run is not None  # warm_up_decode ran through it
    torch.manual_seed(0)
    prompts = [torch.randint(0, 200, (1, n)) for n in (5, 9, 3)]
    slots = torch.tensor([2, 0, 3])  # rows in other slots than their index: gather path
    for net in (eager, model):
        for slot, prompt in zip(slots.tolist(), prompts, strict=True):
            positions = torch.arange(prompt.shape[1])[None]
            net(prompt, positions, torch.tensor([slot]), kv_len=prompt.shape[1])  # eager prefill
    positions = torch.tensor([[5], [9], [3]])
    tokens = torch.tensor([[7], [8], [9]])
    for step in range(4):  # kv_len changes every step: symbolic, no recompile
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
        kv_len = int(positions.max()) + 1
        want = eager(tokens, positions, slots, kv_len=kv_len)  # (3, 1, V)
        got = model(tokens, positions, slots, kv_len=kv_len)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tokens = want[:, -1].argmax(-1, keepdim=True)
        positions = positions + 1
    assert counters["stats"]["unique_graphs"] == graphs  # kv_len 11, 12, 13 reused one graph
    assert sum(counters["graph_break"].values()) == breaks  # whole steps, no breaks
    # Single row without slots (generate's path) agrees too.
    single = (torch.tensor([[11]]), torch.tensor([[9]]))
    torch.testing.assert_close(
        model(*single, kv_len=10), eager(*single, kv_len=10), atol=1e-4, rtol=1e-4
    )


def test_prefill_stays_eager(tiny_gguf: Callable[..., Path]) -> None:
    loaded = load_model(tiny_gguf(), quant="fp16", max_batch=1, max_seq_len=32)
    model = loaded.model
    calls: list[int] = []

    def spy(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tokens.shape[1])
        return model._run(tokens, *args, **kwargs)

    model._compiled_run = spy
    with torch.inference_mode():
        model(torch.ones(1, 8, dtype=torch.long), torch.arange(8)[None], kv_len=8)
        model(torch.ones(1, 1, dtype=torch.long), torch.tensor([[8]]), kv_len=9)
    assert calls == [1] and SMALL_T_ATTENTION < 8
