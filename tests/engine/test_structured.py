"""Grammar-constrained decoding with llguidance on the real SmolLM2 tokenizer and model."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llm_backend.engine.loader import LoadedModel
from llm_backend.engine.sampling import SamplingParams
from llm_backend.engine.scheduler import EngineRequest, RequestOutput, Scheduler, SchedulerConfig
from llm_backend.engine.structured import (
    GrammarCompiler,
    StructuredOutputError,
    ToolSpec,
    allocate_bitmask,
    apply_token_bitmask,
    fill_bitmask,
    parse_tool_calls,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(smollm2_int8: LoadedModel) -> GrammarCompiler:
    return GrammarCompiler(smollm2_int8.tokenizer, smollm2_int8.args.vocab_size)


def test_bitmask_masks_disallowed_tokens(compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(compiler.json_schema({"type": "integer"}))
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    fill_bitmask(matcher, bitmask, 0)
    logits = torch.zeros(1, compiler.vocab_size)
    apply_token_bitmask(logits, torch.from_numpy(bitmask))
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 1000  # digits and minus sign pieces only
    assert all(matcher.validate_tokens([token]) == 1 for token in allowed[:50])


def test_bad_schema_and_bad_tool_choice_raise(compiler: GrammarCompiler) -> None:
    with pytest.raises(StructuredOutputError, match="objectx"):
        compiler.json_schema({"type": "objectx"})
    with pytest.raises(StructuredOutputError, match="at least one tool"):
        compiler.tool_call([], "required")


def test_parse_tool_calls_returns_openai_shape() -> None:
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    assert parse_tool_calls("<tool_call>not json</tool_call>")[1] == []


def _generate(
    loaded: LoadedModel, grammar: str, prompt: str, seeds: list[int], max_tokens: int
) -> list[RequestOutput]:
    tok = loaded.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    scheduler = Scheduler(loaded.model, tok, SchedulerConfig(max_running=8))
    sinks: list[list[RequestOutput]] = []
    for seed in seeds:
        sink: list[RequestOutput] = []
        sinks.append(sink)
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens)
        scheduler.add_request(
            EngineRequest(f"s{seed}", prompt_ids, params, sink.append, grammar=grammar)
        )
    while scheduler.has_work():
        scheduler.step()
    finals = []
    for sink in sinks:
        sink[-1].text = "".join(o.text for o in sink)
        finals.append(sink[-1])
    return finals


@pytest.mark.integration
@pytest.mark.slow
def test_twenty_sampled_generations_all_match_the_schema(
    smollm2_int8: LoadedModel, compiler: GrammarCompiler
) -> None:
    grammar = compiler.json_schema(PERSON)
    outputs = _generate(smollm2_int8, grammar, "Invent a user record.", list(range(20)), 80)
    texts = [o.text for o in outputs]
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
    assert len(set(texts)) > 1  # temperature 1.0 with different seeds: not all the same


@pytest.mark.integration
@pytest.mark.slow
def test_required_tool_call_is_valid_for_every_seed(
    smollm2_int8: LoadedModel, compiler: GrammarCompiler
) -> None:
    tool = ToolSpec(
        "lookup",
        "Look up a word.",
        {
            "type": "object",
            "properties": {
                "word": {"type": "string", "maxLength": 15},
                "limit": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["word", "limit"],
            "additionalProperties": False,
        },
    )
    grammar = compiler.tool_call([tool], "required")
    for output in _generate(smollm2_int8, grammar, "Define 'serendipity'.", [1, 2, 3, 4], 60):
        content, calls = parse_tool_calls(output.text)
        assert output.finish_reason == "stop" and content == ""
        assert len(calls) == 1 and calls[0].name == "lookup"
        jsonschema.validate(json.loads(calls[0].arguments), tool.parameters)
