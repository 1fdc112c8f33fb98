"""Batched token sampling with per-row parameters and per-row seeded generators.

Each row of a batch may have its own temperature, top-k, top-p, min-p and
penalties; they travel as tensors (``BatchSamplingTensors``) so one call samples
the whole batch without host syncs. Temperature 0 means greedy for that row.

Sampling uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d.
draws token i with probability p_i. A row with a seed draws its noise from its own
``torch.Generator``, so its output does not depend on what else is in the batch.

Example:
    >>> params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1)]
    >>> tensors = BatchSamplingTensors.from_params(params)
    >>> generators = make_generators(params)
    >>> tokens, logprobs = sample(logits, tensors, None, generators)  # logits: (2, V)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

_MIN_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request picks its tokens (OpenAI field names where they exist)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> SamplingParams:
        """Raise ``ValueError`` naming the first bad field and its value; return self."""
        checks: list[tuple[bool, str]] = [
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0.0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
            ),
            (
                self.seed is None or isinstance(self.seed, int),
                f"seed must be an int or None, got {self.seed!r}",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                f"stop must be a list of non-empty strings, got {self.stop!r}",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def greedy(self) -> bool:
        """Temperature 0: always the most likely token."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether this request needs token counts."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class BatchSamplingTensors:
    """Per-row sampling parameters as (B,) tensors, plus host flags to skip unused work."""

    temperature: Tensor  # (B,) float32, 0 for greedy rows
    top_k: Tensor  # (B,) long, V for "off"
    top_p: Tensor  # (B,) float32
    min_p: Tensor  # (B,) float32
    repetition_penalty: Tensor  # (B,) float32
    presence_penalty: Tensor  # (B,) float32
    frequency_penalty: Tensor  # (B,) float32
    greedy: Tensor  # (B,) bool
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], vocab_size: int = 1 << 30, device: str = "cpu"
    ) -> BatchSamplingTensors:
        """Stack ``params`` (one per row) into tensors on ``device``."""

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        return cls(
            temperature=floats([p.temperature for p in params]),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            repetition_penalty=floats([p.repetition_penalty for p in params]),
            presence_penalty=floats([p.presence_penalty for p in params]),
            frequency_penalty=floats([p.frequency_penalty for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            all_greedy=all(p.greedy for p in params),
            any_top_k=any(0 < p.top_k < vocab_size and not p.greedy for p in params),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            any_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            any_penalty=any(p.uses_penalties for p in params),
        )


def make_generators(
    params: list[SamplingParams], device: str = "cpu"
) -> list[torch.Generator | None]:
    """One seeded ``torch.Generator`` per row that has a seed, None for the others."""
    generators: list[torch.Generator | None] = []
    for p in params:
        if p.seed is None:
            generators.append(None)
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(p.seed)
            generators.append(generator)
    return generators


def apply_penalties(logits: Tensor, params: BatchSamplingTensors, token_counts: Tensor) -> Tensor:
    """Repetition (CTRL-style, divide positive / multiply negative logits), presence and
    frequency (OpenAI-style, subtract) penalties from per-row token counts (B, V)."""
    seen = token_counts > 0  # (B, V)
    rep = params.repetition_penalty[:, None]  # (B, 1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - params.presence_penalty[:, None] * seen.to(logits.dtype)
    return logits - params.frequency_penalty[:, None] * token_counts.to(logits.dtype)


def _exponential_noise(
    shape: tuple[int, int], generators: list[torch.Generator | None] | None, device: torch.device
) -> Tensor:
    """Exp(1) noise (B, V); row b from ``generators[b]`` when it has one."""
    noise = torch.empty(shape, device=device).exponential_()
    if generators is not None:
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
    return noise


def sample(
    logits: Tensor,
    params: BatchSamplingTensors,
    token_counts: Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pick one token per row.

    Args:
        logits: (B, V) float logits of the next position.
        params: Per-row parameters (``BatchSamplingTensors.from_params``).
        token_counts: (B, V) int counts of tokens generated so far, for penalties.
        generators: Per-row generators (``make_generators``); None rows use the global RNG.

    Returns:
        tokens (B,) long, and logprobs (B,) float32: the chosen token's log-probability
        under the model's distribution after penalties, before temperature and filtering.
    """
    logits = logits.float()
    if params.any_penalty and token_counts is not None:
        logits = apply_penalties(logits, params, token_counts)
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, V)
    greedy_tokens = logits.argmax(dim=-1)  # (B,)
    if params.all_greedy:
        return greedy_tokens, log_probs.gather(1, greedy_tokens[:, None]).squeeze(1)

    temperature = params.temperature.clamp(min=_MIN_TEMPERATURE)[:, None]  # (B, 1)
    scaled = logits / temperature  # (B, V)
    if params.any_min_p:
        probs = torch.softmax(scaled, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * params.min_p[:, None]  # (B, 1)
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    if params.any_top_k or params.any_top_p:
        # Find each row's cutoff logit in sorted order, then mask in vocabulary order, so
        # the noise race below is indexed by token id whatever the batch needs.
        sorted_logits = scaled.sort(dim=-1, descending=True).values  # (B, V)
        ranks = torch.arange(scaled.shape[-1], device=scaled.device)  # (V,)
        keep = ranks[None, :] < params.top_k[:, None]  # (B, V) within top-k
        if params.any_top_p:
            sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
            keep = keep & (mass_before <= params.top_p[:, None])  # keeps at least the top token
        n_kept = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        cutoff = sorted_logits.gather(1, n_kept - 1)  # (B, 1) smallest kept logit
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))  # ties at the cutoff stay
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    noise = _exponential_noise((probs.shape[0], probs.shape[1]), generators, probs.device)
    sampled = (probs / noise).argmax(dim=-1)  # (B,) exponential race
    tokens = torch.where(params.greedy, greedy_tokens, sampled)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row and their log-probabilities, (B, k) each."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    return ids, values
