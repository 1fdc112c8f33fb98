"""The engine's OpenAI-compatible server: real uvicorn on loopback, real SmolLM2 (int8).

Clients: the official ``openai`` package, LangChain ``ChatOpenAI`` and raw ``httpx``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jsonschema
import pytest
import uvicorn
from openai import OpenAI

from llm_backend.engine.async_engine import AsyncEngine
from llm_backend.engine.loader import LoadedModel
from llm_backend.engine.scheduler import SchedulerConfig
from llm_backend.engine.server import create_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@dataclass
class Served:
    engine: AsyncEngine
    base_url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(engine: AsyncEngine) -> Iterator[Served]:
    """Run ``create_app(engine)`` under uvicorn in a thread; stop both afterwards."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Served(engine, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


@pytest.fixture(scope="module")
def served(smollm2_int8: LoadedModel) -> Iterator[Served]:
    engine = AsyncEngine(smollm2_int8, model_name=MODEL, config=SchedulerConfig(max_running=8))
    yield from serve(engine.start())


@pytest.fixture(scope="module")
def client(served: Served) -> OpenAI:
    return OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _wait_idle(engine: AsyncEngine, seconds: float) -> float:
    start = time.monotonic()
    while engine.num_running or engine.num_waiting:
        if time.monotonic() - start > seconds:
            break
        time.sleep(0.05)
    return time.monotonic() - start


# ---------------------------------------------------------------------- happy paths
def test_models_health_and_metrics(served: Served, client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{served.base_url}/health").json()
    assert health["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=3)
    text = httpx.get(f"{served.base_url}/metrics").text
    for name in (
        "ragloom_engine_queue_depth",
        "ragloom_engine_running_requests",
        "ragloom_engine_generation_tokens_total",
        "ragloom_engine_generation_tokens_per_second",
        "ragloom_engine_time_to_first_token_seconds_bucket",
        "ragloom_engine_prefix_cache_hit_tokens_total",
    ):
        assert name in text
    generated = [
        ln for ln in text.splitlines() if ln.startswith("ragloom_engine_generation_tokens_total")
    ]
    assert float(generated[0].rsplit(" ", 1)[1]) >= 3


def test_chat_plain(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=12,
    )
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 10
    assert 1 <= reply.usage.completion_tokens <= 12


def test_chat_stream_with_usage_matches_non_stream(client: OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=10, seed=1)
    plain = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_string_and_logprobs(client: OpenAI) -> None:
    free = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=12
    )
    text = free.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3
    stopped = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        temperature=0,
        max_tokens=12,
        stop=[words[2]],
        logprobs=True,
        top_logprobs=2,
    )
    content = stopped.choices[0].message.content or ""
    assert content == text[: text.index(words[2])]
    assert stopped.choices[0].finish_reason == "stop"
    logprobs = stopped.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in logprobs.content)


def test_completions_plain_and_stream(client: OpenAI) -> None:
    plain = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert plain.choices[0].text and plain.usage is not None
    assert plain.usage.completion_tokens <= 6
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        if c.choices
    )
    assert streamed == plain.choices[0].text


# ---------------------------------------------------------------------- structured output
def _check_weather_call(tool_calls: list) -> None:  # type: ignore[type-arg]
    assert tool_calls and len(tool_calls) == 1
    call = tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])  # type: ignore[index]


def test_tool_choice_named_and_required(client: OpenAI) -> None:
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
            tool_choice=choice,
            temperature=0.7,
            seed=5,
            max_tokens=60,  # type: ignore[arg-type]
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        if choice == "required":
            assert message.tool_calls and message.tool_calls[0].function.name in (
                "get_weather",
                "get_time",
            )
            name = message.tool_calls[0].function.name
            params = (WEATHER_TOOL if name == "get_weather" else TIME_TOOL)["function"][
                "parameters"
            ]  # type: ignore[index]
            jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), params)
        else:
            _check_weather_call(message.tool_calls)  # type: ignore[arg-type]


def test_tool_call_streamed_and_followed_by_tool_result(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            temperature=0,
            max_tokens=60,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    _check_weather_call(deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    call = deltas[0]
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK_WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.function.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=12,  # type: ignore[list-item]
    )
    assert follow_up.choices[0].message.content
    assert follow_up.choices[0].finish_reason in ("stop", "length")


def test_response_format_json_schema_and_json_object(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
        temperature=1.0,
        seed=3,
        max_tokens=40,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a JSON object prefix
        assert (reply.choices[0].message.content or "").startswith("{")


# ---------------------------------------------------------------------- LangChain
def test_langchain_invoke_stream_and_bind_tools(served: Served) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(
        model=MODEL,
        base_url=f"{served.base_url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=10,
        max_retries=0,
    )
    answer = llm.invoke("What is the capital of France?")
    assert isinstance(answer.content, str) and answer.content
    streamed = "".join(str(chunk.content) for chunk in llm.stream("What is the capital of France?"))
    assert streamed == answer.content

    class GetWeather(BaseModel):
        """Current weather of a city."""

        city: str = Field(max_length=20)

    with_tools = ChatOpenAI(
        model=MODEL,
        base_url=f"{served.base_url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=40,
        max_retries=0,
    ).bind_tools([GetWeather], tool_choice="GetWeather")
    message = with_tools.invoke("What is the weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"  # type: ignore[attr-defined]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- cancellation
def test_client_disconnect_mid_stream_frees_the_slot(served: Served) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    url = f"{served.base_url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                received += 1
            if received >= 4:
                break
        assert served.engine.num_running == 1
    # The connection is closed: the engine must drop the request at its next step.
    waited = _wait_idle(served.engine, 10)
    assert served.engine.num_running == 0, f"still running after {waited:.1f}s"
    metrics = httpx.get(f"{served.base_url}/metrics").text
    assert 'reason="abort"' in metrics


# ---------------------------------------------------------------------- bad requests
def _post(served: Served, body: object, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{served.base_url}{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


BASE = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        (b'{"model": "smollm2-135m", "messages": [', 400, None, "not valid JSON"),
        ({**BASE, "model": "gpt-4o"}, 404, "model", "gpt-4o"),
        (
            {**BASE, "messages": [{"role": "user", "content": "word " * 3000}]},
            400,
            "messages",
            "maximum context length is 2048",
        ),
        ({**BASE, "max_tokens": 4000}, 400, "max_tokens", "maximum context length"),
        ({**BASE, "temperature": -1}, 400, "temperature", "temperature"),
        ({**BASE, "top_p": 0}, 400, "top_p", "top_p"),
        ({**BASE, "presence_penalty": 5}, 400, "presence_penalty", "presence_penalty"),
        ({**BASE, "n": 2}, 400, "n", "n must be 1"),
        ({"model": MODEL}, 400, "messages", "messages"),
        ({**BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", ""),
        (
            {
                **BASE,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                },
            },
            400,
            "response_format",
            "objectx",
        ),
        (
            {
                **BASE,
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            400,
            "tool_choice",
            "nope",
        ),
        ({**BASE, "tool_choice": "required"}, 400, "tool_choice", "tools"),
    ],
)
def test_bad_requests_get_openai_errors(
    served: Served, body: object, status: int, param: str | None, needle: str
) -> None:
    response = _post(served, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert needle in error["message"]


def test_body_that_is_not_an_object_is_a_400(served: Served) -> None:
    response = httpx.post(
        f"{served.base_url}/v1/chat/completions",
        content=b"[1, 2]",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "JSON object" in response.json()["error"]["message"]


def test_bad_completion_request(served: Served) -> None:
    response = _post(served, {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "/v1/completions")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
