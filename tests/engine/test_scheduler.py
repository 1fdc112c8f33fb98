"""Scheduler logic on a tiny deterministic fake model (the real model: test_scheduler_real.py).

The fake's next token depends on every token its slot holds in cache at positions
<= the query, so wrong slots, wrong positions, a bad prefix copy or a missing chunk
all change the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from llm_backend.engine.errors import EngineError
from llm_backend.engine.sampling import SamplingParams
from llm_backend.engine.scheduler import (
    EngineOverloaded,
    EngineRequest,
    RequestOutput,
    Scheduler,
    SchedulerConfig,
)

VOCAB = 26  # token i is the letter chr(ord("a") + i); token 25 ("z") is eos


@dataclass
class _Args:
    vocab_size: int = VOCAB


class FakeModel:
    """Writes token ids into a (slots, S) "KV cache"; logits one-hot on a hash of it."""

    def __init__(self, max_batch: int = 8, max_seq_len: int = 128) -> None:
        self.args = _Args()
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.cache = torch.full((max_batch, max_seq_len), -1, dtype=torch.long)
        self.forward_shapes: list[tuple[int, int]] = []
        self.copies: list[tuple[int, int, int]] = []

    def __call__(self, tokens, input_pos, slots=None, *, last_only=False, logits_index=None,
                 kv_len=None, first_slot=None):  # fmt: skip
        B, T = tokens.shape
        self.forward_shapes.append((B, T))
        if slots is None:
            slots = torch.arange(B)
        if first_slot is not None:  # the scheduler's promise: consecutive slots from there
            assert slots.tolist() == list(range(first_slot, first_slot + B))
        for b in range(B):
            self.cache[slots[b], input_pos[b]] = tokens[b]
        logits = torch.zeros(B, T, VOCAB)
        for b in range(B):
            for t in range(T):
                pos = int(input_pos[b, t])
                seen = self.cache[slots[b], : pos + 1]
                weights = torch.arange(1, pos + 2)
                nxt = int((seen * weights).sum() + 7 * pos) % (VOCAB - 1)  # never eos
                logits[b, t, nxt] = 10.0
        if last_only:
            index = logits_index if logits_index is not None else torch.full((B,), T - 1)
            logits = logits[torch.arange(B), index].unsqueeze(1)
        return logits

    def fill_cache(self, tokens, input_pos, slots=None, *, kv_len=None, first_slot=None):
        self(tokens, input_pos, slots, kv_len=kv_len, first_slot=first_slot)

    def copy_slot_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        self.copies.append((src_slot, dst_slot, length))
        self.cache[dst_slot, :length] = self.cache[src_slot, :length]

    def release_cache_memory(self) -> None:  # as the real one: the cache reads zeros
        self.cache.zero_()


class _Decoder:
    def __init__(self) -> None:
        self.pending = ""

    def push(self, token: int) -> str:
        return chr(ord("a") + token)

    def flush(self) -> str:
        return ""


class FakeTokenizer:
    def __init__(self) -> None:
        self.eos_token_ids = {25}
        self.vocab_size = VOCAB

    def incremental_decoder(self) -> _Decoder:
        return _Decoder()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def _run(scheduler: Scheduler, requests: list[EngineRequest]) -> None:
    for request in requests:
        scheduler.add_request(request)
    for _ in range(10_000):
        if not scheduler.has_work():
            return
        scheduler.step()
    raise AssertionError("scheduler did not finish")


def _request(rid: str, prompt: list[int], sink: dict[str, list[RequestOutput]], **params):
    sink[rid] = []
    return EngineRequest(
        rid,
        prompt,
        SamplingParams(temperature=0.0, **params),
        on_output=sink[rid].append,
    )


def _text(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def _prompt(length: int, seed: int) -> list[int]:
    return [(seed * 7 + i * 3) % 20 for i in range(length)]


def test_batched_chunked_output_equals_alone() -> None:
    prompts = [_prompt(n, i) for i, n in enumerate([5, 40, 17, 3, 64, 9, 33, 21])]
    alone = {}
    for i, prompt in enumerate(prompts):
        sink: dict[str, list[RequestOutput]] = {}
        _run(
            Scheduler(FakeModel(), FakeTokenizer()),
            [_request(f"r{i}", prompt, sink, max_tokens=12)],
        )
        alone[i] = _text(sink[f"r{i}"])
    model = FakeModel()
    config = SchedulerConfig(max_running=8, prefill_chunk=16, idle_prefill_chunk=16)
    scheduler = Scheduler(model, FakeTokenizer(), config)
    sink = {}
    _run(scheduler, [_request(f"r{i}", p, sink, max_tokens=12) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        assert _text(sink[f"r{i}"]) == alone[i]
        final = sink[f"r{i}"][-1]
        assert final.finished and final.finish_reason == "length"
        assert final.completion_tokens == 12 and final.prompt_tokens == len(prompts[i])
    # Chunked prefill: no forward wider than the chunk budget, and decode rows batched.
    assert all(B * T <= 16 or B == 1 for B, T in model.forward_shapes if T > 1)
    assert max(B for B, T in model.forward_shapes if T == 1) >= 6
    assert scheduler.num_running == 0


def test_decode_interleaves_with_long_prefill() -> None:
    model = FakeModel(max_seq_len=256)
    scheduler = Scheduler(model, FakeTokenizer(), SchedulerConfig(max_running=2, prefill_chunk=16))
    sink: dict[str, list[RequestOutput]] = {}
    scheduler.add_request(_request("short", _prompt(4, 1), sink, max_tokens=30))
    scheduler.step()  # short prompt prefilled
    assert not sink["short"]
    scheduler.step()  # its last prompt token decoded: first token out
    assert len(sink["short"]) == 1
    scheduler.add_request(_request("long", _prompt(160, 2), sink, max_tokens=2))
    tokens_during_long_prefill = 0
    while any(not o.finished for o in sink["long"][-1:]) or not sink["long"]:
        before = len(sink["short"])
        scheduler.step()
        tokens_during_long_prefill += len(sink["short"]) - before
        if sink["short"][-1].finished:
            break
    # The 160-token prompt needs 10 chunks; the short request kept decoding meanwhile.
    assert tokens_during_long_prefill >= 9


def test_idle_scheduler_prefills_a_long_prompt_in_one_forward() -> None:
    prompt = _prompt(160, 2)
    sink: dict[str, list[RequestOutput]] = {}
    chunked = FakeModel(max_seq_len=256)
    config = SchedulerConfig(max_running=2, prefill_chunk=16, idle_prefill_chunk=16)
    _run(Scheduler(chunked, FakeTokenizer(), config), [_request("a", prompt, sink, max_tokens=4)])
    # the prompt's last token runs as the first decode step (it gives the first logits)
    assert chunked.forward_shapes == [(1, 16)] * 9 + [(1, 15)] + [(1, 1)] * 4
    idle = FakeModel(max_seq_len=256)
    config = SchedulerConfig(max_running=2, prefill_chunk=16, idle_prefill_chunk=100)
    _run(Scheduler(idle, FakeTokenizer(), config), [_request("b", prompt, sink, max_tokens=4)])
    # nothing decodes while the prompt is read: 100 tokens, then 59, then the last one
    assert idle.forward_shapes == [(1, 100), (1, 59)] + [(1, 1)] * 4
    assert _text(sink["b"]) == _text(sink["a"])
    with pytest.raises(EngineError, match="idle_prefill_chunk must be >= 1, got 0"):
        Scheduler(idle, FakeTokenizer(), SchedulerConfig(max_running=2, idle_prefill_chunk=0))


def test_prefix_cache_reuses_slot_and_keeps_output() -> None:
    system = _prompt(70, 5)
    question_a, question_b = [*system, 1, 2, 3], [*system, 4, 5, 6, 7]
    sink: dict[str, list[RequestOutput]] = {}
    _run(Scheduler(FakeModel(), FakeTokenizer()), [_request("ref", question_b, sink, max_tokens=8)])
    reference = _text(sink["ref"])

    model = FakeModel()
    scheduler = Scheduler(model, FakeTokenizer(), SchedulerConfig(max_running=4, prefill_chunk=32))
    _run(scheduler, [_request("a", question_a, sink, max_tokens=8)])
    assert sink["a"][-1].cached_tokens == 0
    model.cache[:, 80:] = 99  # junk past the cached prefix must never be read
    _run(scheduler, [_request("b", question_b, sink, max_tokens=8)])
    assert sink["b"][-1].cached_tokens == 64  # 70 shared tokens, block 16 -> 64
    assert _text(sink["b"]) == reference
    assert scheduler.prefix_hit_tokens == 64


def test_prefix_copied_from_running_slot() -> None:
    system = _prompt(50, 3)
    sink: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()), [_request("ref", [*system, 9], sink, max_tokens=6)]
    )
    model = FakeModel()
    scheduler = Scheduler(model, FakeTokenizer(), SchedulerConfig(max_running=4, prefill_chunk=64))
    scheduler.add_request(_request("a", [*system, 1], sink, max_tokens=40))
    scheduler.step()  # a prefilled and decoding
    _run(scheduler, [_request("b", [*system, 9], sink, max_tokens=6)])
    assert model.copies and model.copies[0][2] == 48
    assert sink["b"][-1].cached_tokens == 48
    assert _text(sink["b"]) == _text(sink["ref"])


def test_stop_string_across_tokens_is_trimmed_and_never_leaked() -> None:
    sink: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()),
        [_request("free", _prompt(6, 2), sink, max_tokens=20)],
    )
    full = _text(sink["free"])
    stop = full[5:8]  # three letters = three tokens
    sink2: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()),
        [_request("s", _prompt(6, 2), sink2, max_tokens=20, stop=[stop])],
    )
    pieces = [o.text for o in sink2["s"]]
    assert "".join(pieces) == full[: full.index(stop)]
    assert sink2["s"][-1].finish_reason == "stop"
    # Held-back text is never emitted: no chunk ends with a partial stop and is
    # followed by nothing.
    assert stop not in "".join(pieces)


def test_eos_and_stop_token_ids_finish_with_stop() -> None:
    sink: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()),
        [_request("free", _prompt(6, 4), sink, max_tokens=10)],
    )
    first_tokens = _text(sink["free"])
    stop_token = ord(first_tokens[3]) - ord("a")
    sink2: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()),
        [_request("s", _prompt(6, 4), sink2, max_tokens=10, stop_token_ids=[stop_token])],
    )
    assert sink2["s"][-1].finish_reason == "stop"
    assert _text(sink2["s"]) == first_tokens[: first_tokens.index(first_tokens[3])]


def test_context_limit_finishes_with_length() -> None:
    model = FakeModel(max_seq_len=32)
    sink: dict[str, list[RequestOutput]] = {}
    _run(Scheduler(model, FakeTokenizer()), [_request("r", _prompt(28, 1), sink, max_tokens=100)])
    assert sink["r"][-1].finish_reason == "length"
    assert sink["r"][-1].completion_tokens == 4


def test_too_long_prompt_is_an_error_not_a_crash() -> None:
    sink: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(max_seq_len=16), FakeTokenizer()), [_request("r", _prompt(20, 1), sink)]
    )
    assert sink["r"][-1].finish_reason == "error"
    assert "20 tokens" in (sink["r"][-1].error or "")


def test_abort_frees_the_slot() -> None:
    scheduler = Scheduler(FakeModel(), FakeTokenizer(), SchedulerConfig(max_running=1))
    sink: dict[str, list[RequestOutput]] = {}
    scheduler.add_request(_request("a", _prompt(5, 1), sink, max_tokens=100))
    scheduler.add_request(_request("b", _prompt(5, 2), sink, max_tokens=3))
    scheduler.step()
    assert scheduler.num_running == 1 and scheduler.num_waiting == 1
    scheduler.abort("a")
    assert scheduler.num_running == 0
    assert sink["a"][-1].finish_reason == "abort"
    _run(scheduler, [])
    assert sink["b"][-1].finish_reason == "length"


def test_waiting_queue_bound_raises_overloaded() -> None:
    scheduler = Scheduler(FakeModel(), FakeTokenizer(), SchedulerConfig(max_waiting=2))
    sink: dict[str, list[RequestOutput]] = {}
    scheduler.add_request(_request("a", [1], sink))
    scheduler.add_request(_request("b", [1], sink))
    with pytest.raises(EngineOverloaded, match="max_waiting=2"):
        scheduler.add_request(_request("c", [1], sink))


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    def run(batch: int) -> str:
        sink: dict[str, list[RequestOutput]] = {}
        requests = [
            EngineRequest(
                f"r{i}",
                _prompt(8, i),
                SamplingParams(temperature=5.0, seed=11, max_tokens=10),
                on_output=sink.setdefault(f"r{i}", []).append,
            )
            for i in range(batch)
        ]
        _run(Scheduler(FakeModel(), FakeTokenizer()), requests)
        return _text(sink["r0"])

    assert run(1) == run(4)


def test_a_prompt_read_from_cache_but_its_last_token_needs_no_prefill_forward() -> None:
    """The last prompt token always runs as a decode step: a 1-token prompt, or one whose
    other tokens are all cached, goes straight to decoding, with the same output."""
    system = _prompt(64, 4)
    sink: dict[str, list[RequestOutput]] = {}
    _run(
        Scheduler(FakeModel(), FakeTokenizer()), [_request("ref", [*system, 9], sink, max_tokens=5)]
    )
    model = FakeModel()
    scheduler = Scheduler(model, FakeTokenizer(), SchedulerConfig(max_running=4, prefill_chunk=64))
    _run(scheduler, [_request("a", [*system, 1], sink, max_tokens=3)])
    model.forward_shapes.clear()
    _run(scheduler, [_request("b", [*system, 9], sink, max_tokens=5)])
    assert sink["b"][-1].cached_tokens == 64
    assert model.forward_shapes == [(1, 1)] * 5
    assert _text(sink["b"]) == _text(sink["ref"])

    one = FakeModel()
    _run(Scheduler(one, FakeTokenizer()), [_request("c", [7], sink, max_tokens=3)])
    assert one.forward_shapes == [(1, 1)] * 3
    assert sink["c"][-1].completion_tokens == 3 and sink["c"][-1].prompt_tokens == 1
