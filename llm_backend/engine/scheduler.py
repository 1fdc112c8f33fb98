"""Continuous batching over the model's KV-cache slots, with chunked prefill and prefix caching.

One ``Scheduler`` owns the model and runs in one thread (``AsyncEngine`` wraps it).
Each ``step()``:

1. admits waiting requests into free cache slots, reusing cached KV of the longest
   block-aligned prompt prefix another slot holds (in place for a free slot, or by
   ``model.copy_slot_prefix`` from a running one);
2. runs ONE batched decode forward over every request whose prompt is cached up to its
   last token, (B, 1): a prompt's last token runs here, beside the running rows, and
   gives its first token, so every sampled token's logits come from the decode path;
3. runs ONE batched prefill forward over the next chunks of prompts still being read
   (all but their last token; at most ``prefill_chunk`` padded tokens), so long prompts
   never stall decodes; with nothing decoding, ``idle_prefill_chunk`` (a lone prompt
   goes in one forward).

Per token, a request stops on eos / ``stop_token_ids``, stop strings (matched on the
detokenized text across token boundaries and trimmed), a finished grammar,
``max_tokens`` or the context limit. Outputs go to each request's ``on_output``
callback; the one host sync per forward is ``tokens.tolist()``.

Example:
    >>> scheduler = Scheduler(loaded.model, loaded.tokenizer, SchedulerConfig(max_running=8))
    >>> scheduler.add_request(EngineRequest("r1", prompt_ids, SamplingParams(max_tokens=16),
    ...                                     on_output=outputs.append))
    >>> while scheduler.has_work():
    ...     scheduler.step()
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_backend.engine.errors import EngineError
from llm_backend.engine.memory import trim_heap
from llm_backend.engine.model import SMALL_T_ATTENTION
from llm_backend.engine.sampling import (
    BatchSamplingTensors,
    SamplingParams,
    make_generators,
    sample,
    top_logprobs,
)
from llm_backend.engine.structured import GrammarCompiler, allocate_bitmask, apply_token_bitmask

logger = logging.getLogger(__name__)


class EngineOverloaded(EngineError):
    """The waiting queue is full; retry later (HTTP 503)."""


# Padded prefill tokens from which a forward's freed activations are handed back to the
# OS (malloc_trim, ~1 ms): without it peak RSS grew 40-90 MiB over a benchmark's phases.
_TRIM_AFTER_PREFILL_TOKENS = 256
# A prefill forward is padded to at least this many positions a row: the model takes a
# decode step's attention for fewer, so a short prompt (or a prefix-cache remainder)
# prefilled alone would take another path than beside a longer one, and its greedy
# answer would depend on its neighbours.
_MIN_PREFILL_WIDTH = SMALL_T_ATTENTION + 1


@dataclass
class SchedulerConfig:
    """Limits of one scheduler.

    Attributes:
        max_running: Requests decoded together (<= the model's cache slots).
        max_waiting: Requests allowed to wait for a slot; more raise ``EngineOverloaded``.
        prefill_chunk: Padded prompt tokens per prefill forward while requests are
            decoding (chunked prefill: a long prompt never stalls them for long).
        idle_prefill_chunk: The same budget when no request is decoding (nothing to
            stall); never below ``prefill_chunk``. Fewer, wider forwards are faster: each
            one dequantizes the weights again and re-reads the prompt's cached keys
            (SmolLM2 int4 on the Zen 4 kind: a 1,500-token prompt's TTFT 2.0 s in 512-token
            chunks, 1.7 s in one forward).
        prefix_block: Prefix-cache reuse is rounded down to a multiple of this.
        min_prefix: Shortest prefix worth reusing.
    """

    max_running: int = 8
    max_waiting: int = 64
    prefill_chunk: int = 512
    idle_prefill_chunk: int = 2048
    prefix_block: int = 16
    min_prefix: int = 32

    def validate(self, model_slots: int) -> None:
        """Raise ``EngineError`` naming the first bad value."""
        if not 1 <= self.max_running <= model_slots:
            raise EngineError(
                f"max_running must be in [1, {model_slots}] (model cache slots), "
                f"got {self.max_running}"
            )
        for name in (
            "max_waiting",
            "prefill_chunk",
            "idle_prefill_chunk",
            "prefix_block",
            "min_prefix",
        ):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TokenLogprob:
    """Log-probability of one generated token, with the most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; ``finished`` on the last one)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class EngineRequest:
    """A prompt to complete; ``on_output`` is called from the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    grammar: str | None = None  # an llguidance grammar (``GrammarCompiler``)
    ignore_eos: bool = False
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class _Sequence:
    """Scheduler state of one admitted request."""

    request: EngineRequest
    slot: int
    tokens: list[int]  # prompt + generated ids
    prompt_len: int
    max_new: int
    num_computed: int  # positions [0, num_computed) of the slot hold this sequence's KV
    cached_tokens: int
    decoder: Any
    generator: torch.Generator | None
    matcher: Any = None
    text: str = ""  # generated text, stop-trimmed
    emitted: int = 0  # characters of ``text`` already sent
    first_token_time: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        """Whether prompt positions before the last are still to be computed. The last
        prompt token is run as a decode step, which gives the first token's logits."""
        return self.num_computed < self.prompt_len - 1

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case: one extends the other
        return n
    low, high = 0, n  # binary search on prefix equality (list slices compare in C)
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best


def _first_of_run(slot_ids: list[int]) -> int | None:
    """``slot_ids[0]`` when the ids are consecutive (s, s + 1, ...), else None."""
    first = slot_ids[0]
    return first if slot_ids == list(range(first, first + len(slot_ids))) else None


class Scheduler:
    """Continuous-batching scheduler over one model (not thread-safe: one owner thread).

    Args:
        model: A ``Transformer`` with caches set up (``max_batch`` slots).
        tokenizer: The engine tokenizer (``eos_token_ids``, ``incremental_decoder``).
        config: Limits (``SchedulerConfig``).
        grammars: Compiler for constrained requests; built on first use when None.
        metrics: Optional ``EngineMetrics`` to update.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: SchedulerConfig | None = None,
        *,
        grammars: GrammarCompiler | None = None,
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SchedulerConfig(max_running=model.max_batch)
        self.config.validate(model.max_batch)
        self.max_seq_len: int = model.max_seq_len
        self.vocab_size: int = int(model.args.vocab_size)
        self.metrics = metrics
        self._grammars = grammars
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[str, _Sequence] = {}
        slots = self.config.max_running
        self._free_slots: list[int] = list(range(slots))
        self._slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # valid KV per slot
        self._slot_last_used: list[float] = [0.0] * slots
        self._token_counts = torch.zeros(slots, self.vocab_size, dtype=torch.int32)
        self._eos_ids = frozenset(int(i) for i in tokenizer.eos_token_ids)
        self.prefix_hit_tokens = 0  # total prompt tokens served from the prefix cache
        self.generated_tokens = 0
        # No slot holds a known prefix yet: what the cache holds is dead, free its memory.
        model.release_cache_memory()

    # ----------------------------------------------------------------- queue API
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammars

    def add_request(self, request: EngineRequest) -> None:
        """Queue ``request``; raise ``EngineOverloaded`` when the waiting queue is full."""
        if len(self.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(
                f"engine overloaded: {len(self.waiting)} requests already waiting "
                f"(max_waiting={self.config.max_waiting})"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its slot is free for the next step."""
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._emit_final(request, "abort", prompt_tokens=len(request.prompt_ids))
                return
        seq = self.running.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def abort_all(self, message: str) -> None:
        """Fail every request (used when a step raised)."""
        for request in list(self.waiting):
            self._emit_final(request, "error", error=message)
        self.waiting.clear()
        for seq in list(self.running.values()):
            self._finish(seq, "error", error=message)

    # ----------------------------------------------------------------- stepping
    def step(self) -> None:
        """Admit, then one decode forward and one prefill forward (each when needed)."""
        self._admit()
        decoding = [s for s in self.running.values() if not s.prefilling]
        if decoding:
            self._decode(decoding)
        prefilling = self._pick_prefill_chunks(idle=not decoding)
        if prefilling:
            self._prefill(prefilling)
        if self.metrics is not None:
            self.metrics.set_queue(len(self.waiting), len(self.running))

    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            request = self.waiting.popleft()
            prompt_len = len(request.prompt_ids)
            if prompt_len == 0 or prompt_len >= self.max_seq_len:
                self._emit_final(
                    request,
                    "error",
                    prompt_tokens=prompt_len,
                    error=f"prompt has {prompt_len} tokens; it must have between 1 and "
                    f"{self.max_seq_len - 1} (context limit {self.max_seq_len})",
                )
                continue
            try:
                matcher = (
                    self.grammars.matcher(request.grammar) if request.grammar is not None else None
                )
            except EngineError as exc:
                self._emit_final(request, "error", prompt_tokens=prompt_len, error=str(exc))
                continue
            slot, cached = self._claim_slot(request.prompt_ids)
            self._token_counts[slot].zero_()
            seq = _Sequence(
                request=request,
                slot=slot,
                tokens=list(request.prompt_ids),
                prompt_len=prompt_len,
                max_new=min(request.params.max_tokens, self.max_seq_len - prompt_len),
                num_computed=cached,
                cached_tokens=cached,
                decoder=self.tokenizer.incremental_decoder(),
                generator=make_generators([request.params])[0],
                matcher=matcher,
            )
            self.running[request.request_id] = seq
            self.prefix_hit_tokens += cached
            if self.metrics is not None:
                self.metrics.on_admit(prompt_len, cached, time.perf_counter() - request.arrival)
            logger.debug("admitted %s into slot %d (%d cached)", request.request_id, slot, cached)

    def _claim_slot(self, prompt: list[int]) -> tuple[int, int]:
        """Pick a free slot for ``prompt``; return it and how many prompt tokens it
        already holds in cache (copied from a running slot when that one matches best)."""
        block = self.config.prefix_block
        limit = len(prompt) - 1  # the last prompt token is always recomputed for its logits

        def usable(length: int) -> int:
            length = min(length, limit) // block * block
            return length if length >= self.config.min_prefix else 0

        best_free, best_free_len = -1, 0
        for slot in self._free_slots:
            length = usable(_common_prefix_len(self._slot_tokens[slot], prompt))
            if length > best_free_len:
                best_free, best_free_len = slot, length
        best_run, best_run_len = -1, 0
        for seq in self.running.values():
            length = usable(_common_prefix_len(seq.tokens[: seq.num_computed], prompt))
            if length > best_run_len:
                best_run, best_run_len = seq.slot, length
        if best_free >= 0 and best_free_len >= best_run_len:
            self._free_slots.remove(best_free)
            return best_free, best_free_len
        # No reusable free slot: evict the least useful one (empty first, then LRU).
        slot = min(
            self._free_slots,
            key=lambda s: (bool(self._slot_tokens[s]), self._slot_last_used[s]),
        )
        self._free_slots.remove(slot)
        self._slot_tokens[slot] = []
        if best_run_len:
            self.model.copy_slot_prefix(best_run, slot, best_run_len)
            return slot, best_run_len
        return slot, 0

    def _pick_prefill_chunks(self, *, idle: bool) -> list[tuple[_Sequence, int]]:
        """Prompt chunks for this step: FCFS, at most ``prefill_chunk`` padded tokens
        (``idle``: no request decoded this step, ``idle_prefill_chunk``)."""
        budget = self.config.prefill_chunk
        if idle:
            budget = max(budget, self.config.idle_prefill_chunk)
        chosen: list[tuple[_Sequence, int]] = []
        width = 0
        for seq in sorted(self.running.values(), key=lambda s: s.request.arrival):
            if not seq.prefilling:
                continue
            chunk = min(seq.prompt_len - 1 - seq.num_computed, budget)
            new_width = max(width, chunk)
            if chosen and (
                new_width * (len(chosen) + 1) > budget
                or any(s.num_computed + new_width > self.max_seq_len for s, _ in chosen)
                or seq.num_computed + new_width > self.max_seq_len
            ):
                continue
            chosen.append((seq, chunk))
            width = new_width
        return chosen

    # ----------------------------------------------------------------- forwards
    def _prefill(self, chunks: list[tuple[_Sequence, int]]) -> None:
        width = max(chunk for _, chunk in chunks)
        room = self.max_seq_len - max(seq.num_computed for seq, _ in chunks)
        width = max(width, min(_MIN_PREFILL_WIDTH, room))
        rows = []
        positions = []
        for seq, chunk in chunks:
            start = seq.num_computed
            rows.append(seq.tokens[start : start + chunk] + [0] * (width - chunk))
            # Padding continues the positions; its garbage KV lies past the prompt and
            # is overwritten by decode before anything attends to it.
            positions.append(list(range(start, start + width)))
        tokens = torch.tensor(rows, dtype=torch.long)  # (B, T)
        input_pos = torch.tensor(positions, dtype=torch.long)  # (B, T)
        slot_ids = [seq.slot for seq, _ in chunks]
        slots = torch.tensor(slot_ids, dtype=torch.long)  # (B,)
        kv_len = max(seq.num_computed for seq, _ in chunks) + width
        # Only the cache is wanted: a prompt's last token runs as a decode step, so the
        # first token's logits come from the path every later token takes (the int4
        # kernels' exact or float32 weights, not the dense path's bf16-rounded ones).
        self.model.fill_cache(
            tokens, input_pos, slots, kv_len=kv_len, first_slot=_first_of_run(slot_ids)
        )
        if len(chunks) * width >= _TRIM_AFTER_PREFILL_TOKENS:
            # a long prompt's activations are freed now; glibc would keep their pages
            trim_heap()
        for seq, chunk in chunks:
            seq.num_computed += chunk
        if self.metrics is not None:
            self.metrics.on_prefill(sum(chunk for _, chunk in chunks))

    def _decode(self, seqs: list[_Sequence]) -> None:
        seqs = sorted(seqs, key=lambda seq: seq.slot)  # consecutive slots read cache views
        tokens = torch.tensor([[seq.tokens[-1]] for seq in seqs], dtype=torch.long)  # (B, 1)
        input_pos = torch.tensor([[seq.num_computed] for seq in seqs], dtype=torch.long)
        slot_ids = [seq.slot for seq in seqs]
        slots = torch.tensor(slot_ids, dtype=torch.long)  # (B,)
        kv_len = max(seq.num_computed for seq in seqs) + 1
        logits = self.model(
            tokens, input_pos, slots, kv_len=kv_len, first_slot=_first_of_run(slot_ids)
        )[:, 0]  # (B, V)
        for seq in seqs:
            seq.num_computed += 1
        self._sample_and_append(seqs, logits)

    def _sample_and_append(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Mask (grammars), sample one token per row, append it and emit outputs."""
        logits = logits.float()  # (B, V)
        constrained = [row for row, seq in enumerate(seqs) if seq.matcher is not None]
        if constrained:
            from llm_backend.engine.structured import fill_bitmask

            bitmask = allocate_bitmask(len(constrained), self.vocab_size)
            for index, row in enumerate(constrained):
                fill_bitmask(seqs[row].matcher, bitmask, index)
            sub = logits[constrained]
            apply_token_bitmask(sub, torch.from_numpy(bitmask))
            logits[constrained] = sub
        params = [seq.request.params for seq in seqs]
        tensors = BatchSamplingTensors.from_params(params, self.vocab_size)
        counts = None
        if tensors.any_penalty:
            counts = self._token_counts[torch.tensor([seq.slot for seq in seqs])]
        generators = [seq.generator for seq in seqs]
        tokens, logprobs = sample(logits, tensors, counts, generators)
        top_k = max((p.top_logprobs for p in params if p.logprobs), default=0)
        top_ids = top_values = None
        if top_k:
            top_ids, top_values = top_logprobs(logits, top_k)
        want_logprobs = any(p.logprobs for p in params)
        token_list: list[int] = tokens.tolist()  # the one host sync of the step
        logprob_list: list[float] = logprobs.tolist() if want_logprobs else []
        top_id_list = top_ids.tolist() if top_ids is not None else []
        top_value_list = top_values.tolist() if top_values is not None else []
        now = time.perf_counter()
        for row, (seq, token) in enumerate(zip(seqs, token_list, strict=True)):
            if seq.request.request_id not in self.running:
                continue
            if seq.request.params.logprobs:
                k = seq.request.params.top_logprobs
                top = [
                    (tid, self._token_text(tid), value)
                    for tid, value in zip(
                        top_id_list[row][:k], top_value_list[row][:k], strict=True
                    )
                ]
                seq.pending_logprobs.append(
                    TokenLogprob(token, self._token_text(token), logprob_list[row], top)
                )
            self._append_token(seq, token, now)

    def _token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    # ----------------------------------------------------------------- tokens and stops
    def _append_token(self, seq: _Sequence, token: int, now: float) -> None:
        params = seq.request.params
        if seq.first_token_time is None:
            seq.first_token_time = now
            if self.metrics is not None:
                self.metrics.on_first_token(now - seq.request.arrival)
        self.generated_tokens += 1
        if self.metrics is not None:
            self.metrics.on_tokens(1)
        is_eos = token in self._eos_ids and not seq.request.ignore_eos
        if is_eos or token in params.stop_token_ids:
            seq.tokens.append(token)  # counted as a completion token, never shown
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        if params.uses_penalties:
            self._token_counts[seq.slot, token] += 1
        grammar_done = False
        if seq.matcher is not None:
            if not seq.matcher.consume_token(token):
                self._finish(seq, "error", error=f"grammar rejected: {seq.matcher.get_error()}")
                return
            grammar_done = seq.matcher.is_stopped()
        seq.text += seq.decoder.push(token)
        if params.stop:
            start = max(0, seq.emitted - max(len(s) for s in params.stop))
            hits = [(seq.text.find(s, start), s) for s in params.stop]
            hits = [(index, s) for index, s in hits if index >= 0]
            if hits:
                seq.text = seq.text[: min(index for index, _ in hits)]
                self._finish(seq, "stop", flush=False)
                return
        if grammar_done:
            self._finish(seq, "stop")
        elif len(seq.tokens) - seq.prompt_len >= seq.max_new:
            self._finish(seq, "length")
        else:
            holdback = _stop_holdback(seq.text, params.stop) if params.stop else 0
            self._emit(seq, len(seq.text) - holdback)

    def _emit(
        self,
        seq: _Sequence,
        upto: int,
        *,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> None:
        upto = max(upto, seq.emitted)
        delta = seq.text[seq.emitted : upto]
        if not delta and finish_reason is None and not seq.pending_logprobs:
            return
        seq.emitted = upto
        output = RequestOutput(
            request_id=seq.request.request_id,
            text=delta,
            token_ids=[] if finish_reason == "abort" else [seq.tokens[-1]],
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.tokens) - seq.prompt_len,
            cached_tokens=seq.cached_tokens,
            logprobs=seq.pending_logprobs or None,
            error=error,
        )
        seq.pending_logprobs = []
        self._deliver(seq.request, output)

    def _finish(
        self, seq: _Sequence, reason: str, *, error: str | None = None, flush: bool = True
    ) -> None:
        if flush and reason in ("stop", "length"):
            seq.text += seq.decoder.flush()
        del self.running[seq.request.request_id]
        slot = seq.slot
        self._slot_tokens[slot] = seq.tokens[: seq.num_computed]
        self._slot_last_used[slot] = time.perf_counter()
        self._free_slots.append(slot)
        if self.metrics is not None:
            self.metrics.on_finish(reason)
        self._emit(seq, len(seq.text), finish_reason=reason, error=error)

    def _emit_final(
        self,
        request: EngineRequest,
        reason: str,
        *,
        prompt_tokens: int = 0,
        error: str | None = None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.on_finish(reason)
        output = RequestOutput(
            request_id=request.request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            error=error,
        )
        self._deliver(request, output)

    @staticmethod
    def _deliver(request: EngineRequest, output: RequestOutput) -> None:
        try:
            request.on_output(output)
        except Exception:  # a consumer's bug must not kill the engine thread
            logger.exception("on_output callback of %s raised", request.request_id)
