"""Plain generation functions (gpt-fast style): ``prefill``, ``decode_one_token``, ``generate``.

``generate`` is a simple static-batch generator: rows may have different prompt
lengths (each row keeps its own positions), and each row stops on its own at an
end-of-sequence / stop token or its ``max_tokens``. The continuous-batching
scheduler builds on ``prefill`` and ``decode_one_token`` directly.

Example:
    >>> loaded = load_model(path, quant="int8")
    >>> prompt = loaded.tokenizer.encode("The capital of France is")
    >>> [out] = generate(loaded.model, loaded.tokenizer, [prompt],
    ...                  [SamplingParams(temperature=0, max_tokens=8)])
    >>> loaded.tokenizer.decode(out)
    ' Paris...'
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_backend.engine.errors import EngineError
from llm_backend.engine.model import Transformer
from llm_backend.engine.sampling import (
    BatchSamplingTensors,
    SamplingParams,
    make_generators,
    sample,
)
from llm_backend.engine.tokenizer import EngineTokenizer

logger = logging.getLogger(__name__)

DONE_CHECK_EVERY = 8  # decode steps between the one host sync that asks "all rows done?"


@torch.inference_mode()
def prefill(
    model: Transformer,
    tokens: Tensor,  # (B, T)
    input_pos: Tensor,  # (B, T)
    slots: Tensor | None,  # (B,) or None for slots 0..B-1
    *,
    kv_len: int | None = None,
    logits_index: Tensor | None = None,  # (B,) last real position per row when right-padded
) -> Tensor:
    """Fill the cache for ``tokens`` and return the logits of each row's last token, (B, V)."""
    logits = model(
        tokens, input_pos, slots, last_only=True, logits_index=logits_index, kv_len=kv_len
    )  # (B, 1, V)
    return logits[:, 0]


@torch.inference_mode()
def decode_one_token(
    model: Transformer,
    tokens: Tensor,  # (B, 1)
    input_pos: Tensor,  # (B, 1)
    slots: Tensor | None,
    params: BatchSamplingTensors,
    *,
    kv_len: int | None = None,
    token_counts: Tensor | None = None,  # (B, V)
    generators: list[torch.Generator | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step for every row: returns next tokens (B,) and their logprobs (B,)."""
    logits = model(tokens, input_pos, slots, kv_len=kv_len)  # (B, 1, V)
    return sample(logits[:, -1], params, token_counts, generators)


def _truncate_at_stop_strings(
    tokenizer: EngineTokenizer, ids: list[int], stops: list[str]
) -> list[int]:
    """Shortest prefix of ``ids`` whose text contains a stop string (the stop string's
    tokens are dropped), or ``ids`` unchanged when none occurs."""
    if not stops or not any(stop in tokenizer.decode(ids) for stop in stops):
        return ids
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if any(stop in text for stop in stops):
            return ids[: end - 1]
    return ids


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: EngineTokenizer,
    prompt_ids_list: list[list[int]],
    params: list[SamplingParams],
) -> list[list[int]]:
    """Generate a completion per prompt; returns the new token ids of each row.

    Row b uses cache slot b. Eos / stop tokens end a row and are not included in its
    output; a stop string truncates the output before the tokens that produced it.

    Raises:
        EngineError: More rows than cache slots, an empty prompt, or a prompt plus
            ``max_tokens`` longer than the cache.
        ValueError: Invalid sampling parameters.
    """
    B = len(prompt_ids_list)
    if len(params) != B:
        raise EngineError(f"got {B} prompts but {len(params)} sampling params")
    if not 0 < B <= model.max_batch:
        raise EngineError(f"batch of {B} rows does not fit {model.max_batch} cache slots")
    for p in params:
        p.validate()
    lengths = [len(ids) for ids in prompt_ids_list]
    max_new = max(p.max_tokens for p in params)
    for row, length in enumerate(lengths):
        if length == 0:
            raise EngineError(f"prompt {row} is empty")
        if length + params[row].max_tokens > model.max_seq_len:
            raise EngineError(
                f"prompt {row} has {length} tokens + max_tokens {params[row].max_tokens} "
                f"> cache length {model.max_seq_len}"
            )
    device = model.device
    vocab = model.args.vocab_size
    sampling = BatchSamplingTensors.from_params(params, vocab, str(device))
    generators = make_generators(params, str(device))

    # Prefill row by row (no padding waste); row b -> slot b. The last prompt token of
    # every row runs as one batched decode step, as in the scheduler: the first token's
    # logits come from the path every later token takes.
    for row, ids in enumerate(prompt_ids_list):
        if len(ids) == 1:
            continue
        tokens = torch.tensor([ids[:-1]], dtype=torch.long, device=device)  # (1, L-1)
        positions = torch.arange(len(ids) - 1, device=device)[None]  # (1, L-1)
        slot = torch.tensor([row], device=device)
        model.fill_cache(tokens, positions, slot, kv_len=len(ids) - 1)
    last = torch.tensor([[ids[-1]] for ids in prompt_ids_list], device=device)  # (B, 1)
    last_pos = torch.tensor([[n - 1] for n in lengths], device=device)  # (B, 1)
    logits = model(last, last_pos, None, kv_len=max(lengths))[:, -1]  # (B, V)

    token_counts = (
        torch.zeros(B, vocab, dtype=torch.int32, device=device) if sampling.any_penalty else None
    )  # (B, V) generated-token counts for penalties
    next_tokens, _ = sample(logits, sampling, token_counts, generators)  # (B,)

    # Per-row stop ids: eos + stop_token_ids, padded with -1.
    stop_lists = [sorted(tokenizer.eos_token_ids | set(p.stop_token_ids)) for p in params]
    width = max(len(s) for s in stop_lists)
    stop_ids = torch.full((B, max(width, 1)), -1, dtype=torch.long, device=device)
    for row, stops in enumerate(stop_lists):
        stop_ids[row, : len(stops)] = torch.tensor(stops, dtype=torch.long)
    max_tokens = torch.tensor([p.max_tokens for p in params], device=device)  # (B,)

    out = torch.zeros(B, max_new, dtype=torch.long, device=device)  # generated ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_generated = torch.zeros(B, dtype=torch.long, device=device)
    positions = torch.tensor(lengths, device=device)  # (B,) next write position
    slots = None  # row b owns slot b: the cache reads views, no gather
    last_position = model.max_seq_len - 1
    step = 0
    for step in range(max_new):
        out[:, step] = next_tokens
        n_generated += (~done).long()
        done |= (next_tokens[:, None] == stop_ids).any(dim=-1) | (n_generated >= max_tokens)
        if step == max_new - 1:
            break
        if (step + 1) % DONE_CHECK_EVERY == 0 and bool(done.all()):
            break
        if token_counts is not None:
            token_counts.scatter_add_(
                1, next_tokens[:, None], torch.ones_like(next_tokens[:, None], dtype=torch.int32)
            )
        kv_len = min(max(lengths) + step + 1, model.max_seq_len)  # host-side bound
        next_tokens, _ = decode_one_token(
            model,
            next_tokens[:, None],
            positions[:, None],
            slots,
            sampling,
            kv_len=kv_len,
            token_counts=token_counts,
            generators=generators,
        )
        # A finished row keeps computing (static batch); clamp so it stays inside its slot.
        positions = (positions + 1).clamp_(max=last_position)
    logger.debug("generate: %d rows, %d decode steps", B, step + 1)

    results: list[list[int]] = []
    stop_sets = [set(s) for s in stop_lists]
    for row, row_ids in enumerate(out[:, : step + 1].tolist()):
        kept: list[int] = []
        for token in row_ids[: params[row].max_tokens]:
            if token in stop_sets[row]:
                break
            kept.append(token)
        results.append(_truncate_at_stop_strings(tokenizer, kept, params[row].stop))
    return results
