"""The scheduler on the real SmolLM2 model: batching and prefix caching keep greedy output."""

from __future__ import annotations

import pytest

from llm_backend.engine.loader import LoadedModel
from llm_backend.engine.model import SMALL_T_ATTENTION
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


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_greedy_output_alone_equals_batched_with_seven_others(
    quant: str, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(f"smollm2_{quant}")
    tokenizer = loaded.tokenizer
    # seven chat prompts of different lengths and a bare 3-token one (shorter than a
    # decode step's attention takes, so its prefill is padded when alone)
    prompts = [_prompt(loaded, i) for i in range(7)] + [tokenizer.encode("Bees make")]
    assert len({len(p) for p in prompts}) == 8
    assert max(len(p) for p in prompts) > 64  # so the 64-token chunking splits some prompts
    assert len(prompts[-1]) <= SMALL_T_ATTENTION

    def scheduler() -> Scheduler:
        return Scheduler(loaded.model, tokenizer, SchedulerConfig(max_running=8, prefill_chunk=64))

    # Alone, a prompt is prefilled in one forward; batched, in 64-token chunks beside
    # others, padded to the longest. The numbers must not care: attention reads whole
    # key blocks and prompt chunks take the quantized linears' dense path whatever the
    # batch. Prompt 3 is one int4 departed on at token 16 when its chunks took the kernel.
    batched = _run(scheduler(), prompts, max_tokens=32)
    for target in (3, 5, 7):  # long prompts that need several chunks; the short one
        alone = _run(scheduler(), [prompts[target]], max_tokens=32)[0]
        assert batched[target].token_ids == alone.token_ids, f"prompt {target}"
        assert alone.text.strip() and len(alone.token_ids) > 12
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
