"""The scheduler on the real SmolLM2 model: batching and prefix caching keep greedy output."""

from __future__ import annotations

import pytest

from llm_backend.engine.loader import LoadedModel
from llm_backend.engine.sampling import SamplingParams
from llm_backend.engine.scheduler import EngineRequest, RequestOutput, Scheduler, SchedulerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPICS = [
    "the history of the bicycle",
    "why the sky is blue",
    "how bread rises",
    "the water cycle",
    "what a compiler does",
    "how bees make honey",
    "the rules of chess",
    "why we need sleep",
]


def _prompt(loaded: LoadedModel, index: int) -> list[int]:
    # Different lengths: a longer user message for higher indexes.
    detail = " Please be precise and mention one surprising fact." * (index * 3)
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Explain {TOPICS[index]} in two sentences.{detail}"}]
    )
    return loaded.tokenizer.encode(text)


def _run(scheduler: Scheduler, prompts: list[list[int]], max_tokens: int) -> list[RequestOutput]:
    sinks: list[list[RequestOutput]] = []
    for i, prompt in enumerate(prompts):
        sink: list[RequestOutput] = []
        sinks.append(sink)
        scheduler.add_request(
            EngineRequest(
                f"r{i}",
                prompt,
                SamplingParams(temperature=0.0, max_tokens=max_tokens),
                on_output=sink.append,
            )
        )
    while scheduler.has_work():
        scheduler.step()
    finals = []
    for sink in sinks:
        final = sink[-1]
        assert final.finished
        final.text = "".join(o.text for o in sink)
        final.token_ids = [t for o in sink for t in o.token_ids]
        finals.append(final)
    return finals


def test_greedy_output_alone_equals_batched_with_seven_others(smollm2_int8: LoadedModel) -> None:
    prompts = [_prompt(smollm2_int8, i) for i in range(8)]
    assert len({len(p) for p in prompts}) == 8
    assert max(len(p) for p in prompts) > 64  # so the 64-token chunking splits some prompts
    config = SchedulerConfig(max_running=8, prefill_chunk=64)
    target = 5  # a long prompt that needs several chunks
    # int8 weights run with bf16 activations: a different batch shape can flip a near-tie
    # argmax after ~20 tokens (fp32 matches over 24 tokens), so compare 12 tokens.
    alone = _run(
        Scheduler(smollm2_int8.model, smollm2_int8.tokenizer, config),
        [prompts[target]],
        max_tokens=12,
    )[0]
    batched = _run(
        Scheduler(
            smollm2_int8.model,
            smollm2_int8.tokenizer,
            SchedulerConfig(max_running=8, prefill_chunk=64),
        ),
        prompts,
        max_tokens=12,
    )
    assert batched[target].text == alone.text
    assert alone.text.strip()
    for final, prompt in zip(batched, prompts, strict=True):
        assert final.prompt_tokens == len(prompt)
        assert final.completion_tokens >= 1
        assert final.finish_reason in ("stop", "length")


def test_prefix_cache_hit_keeps_greedy_output(smollm2_int8: LoadedModel) -> None:
    tok = smollm2_int8.tokenizer
    system = (
        "You are the support assistant of Brightwave, a company selling solar lamps. "
        "Answer briefly and politely. Use only the facts below.\n"
        + "".join(f"Fact {i}: lamp model B{i} charges in {i + 3} hours.\n" for i in range(12))
    )

    def chat(question: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return tok.encode(tok.apply_chat_template(messages))

    first, second = chat("How long does B4 take to charge?"), chat("Which lamp charges fastest?")
    assert len(first) > 150
    cold = _run(
        Scheduler(smollm2_int8.model, tok, SchedulerConfig(max_running=8)), [second], max_tokens=16
    )[0]
    assert cold.cached_tokens == 0
    scheduler = Scheduler(smollm2_int8.model, tok, SchedulerConfig(max_running=8))
    _run(scheduler, [first], max_tokens=4)
    warm = _run(scheduler, [second], max_tokens=16)[0]
    assert warm.cached_tokens >= 128
    assert scheduler.prefix_hit_tokens == warm.cached_tokens
    assert warm.text == cold.text
