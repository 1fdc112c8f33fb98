"""Batched sampling with per-row parameters and per-row seeded generators."""

from __future__ import annotations

import pytest
import torch

from llm_backend.engine.sampling import (
    BatchSamplingTensors,
    SamplingParams,
    apply_penalties,
    make_generators,
    sample,
    top_logprobs,
)

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("temperature", -0.1, "temperature must be >= 0, got -0.1"),
        ("top_k", -3, "top_k must be >= 0 (0 = off), got -3"),
        ("min_p", 2.0, "min_p must be in [0, 1], got 2.0"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0, got 0.0"),
        ("presence_penalty", 3.0, "presence_penalty must be in [-2, 2], got 3.0"),
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("top_logprobs", 50, "top_logprobs must be in [0, 20], got 50"),
        ("stop", [""], "stop must be a list of non-empty strings"),
    ],
)
def test_validate_names_field_and_value(field: str, value: object, message: str) -> None:
    params = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError) as excinfo:
        params.validate()
    assert message in str(excinfo.value)


def test_greedy_rows_take_argmax_and_report_logprobs() -> None:
    logits = _logits(3)
    params = [SamplingParams(temperature=0.0)] * 3
    tokens, logprobs = sample(logits, BatchSamplingTensors.from_params(params, V))
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_mixed_batch_rows_follow_their_own_params() -> None:
    logits = _logits(4, seed=3)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1, seed=1),  # top-1 == greedy
        SamplingParams(temperature=5.0, top_p=1e-6, seed=2),  # only the top token survives
        SamplingParams(temperature=1.0, min_p=1.0, seed=3),  # only tokens as likely as the max
    ]
    tensors = BatchSamplingTensors.from_params(params, V)
    for _ in range(20):
        tokens, _ = sample(logits, tensors, None, make_generators(params))
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_k_restricts_the_support() -> None:
    logits = _logits(1, seed=4).expand(400, V).contiguous()
    params = [SamplingParams(temperature=2.0, top_k=3)] * 400
    tokens, _ = sample(logits, BatchSamplingTensors.from_params(params, V))
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) == 3  # and really samples among them


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(500, 4).contiguous()
    params = [SamplingParams(top_p=0.75)] * 500
    tokens, _ = sample(logits, BatchSamplingTensors.from_params(params, 4))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.75 needs the second token; not the third


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(6000, 3).contiguous()
    torch.manual_seed(0)
    params = [SamplingParams()] * 6000
    tokens, _ = sample(logits, BatchSamplingTensors.from_params(params, 3))
    freq = torch.bincount(tokens, minlength=3).float() / 6000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_seeded_rows_do_not_depend_on_batch_neighbours() -> None:
    logits = _logits(3, seed=5)
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(rows: list[SamplingParams], row_logits: torch.Tensor, row: int) -> list[int]:
        tensors = BatchSamplingTensors.from_params(rows, V)
        generators = make_generators(rows)
        return [int(sample(row_logits, tensors, None, generators)[0][row]) for _ in range(30)]

    alone = run([seeded], logits[:1], 0)
    batched = run(
        [SamplingParams(temperature=0.7), seeded, SamplingParams(top_k=5)],
        torch.stack((logits[2], logits[0], logits[1])),
        1,
    )
    assert alone == batched
    assert len(set(alone)) > 1  # it is sampling, not greedy
    other = run([SamplingParams(temperature=1.0, seed=43)], logits[:1], 0)
    assert other != alone


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1, 1, 3, 0]])
    params = BatchSamplingTensors.from_params(
        [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1)], 4
    )
    out = apply_penalties(logits, params, counts)
    expected = torch.tensor([[2.0 / 2 - 0.5 - 0.1, -2.0 * 2 - 0.5 - 0.1, 1.0 / 2 - 0.5 - 0.3, 0.5]])
    torch.testing.assert_close(out, expected)
    # A strong presence penalty moves greedy off the repeated token.
    strong = [SamplingParams(temperature=0.0, presence_penalty=2.0)]
    tokens, _ = sample(
        logits, BatchSamplingTensors.from_params(strong, 4), torch.tensor([[1, 0, 0, 0]])
    )
    assert int(tokens[0]) == 2


def test_top_logprobs_are_sorted_log_probabilities() -> None:
    logits = _logits(2, seed=6)
    ids, values = top_logprobs(logits, 5)
    assert ids.shape == values.shape == (2, 5)
    assert torch.equal(ids, logits.topk(5).indices)
    assert bool((values[:, :-1] >= values[:, 1:]).all()) and bool((values <= 0).all())
