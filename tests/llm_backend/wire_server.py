"""A small, real OpenAI chat-completions server on loopback, for client tests.

It speaks the wire format (JSON and SSE streaming, tool-call deltas split into
fragments, vLLM-style error bodies) with scripted behaviour keyed on the last
user message, and records every request body it receives:

- ``CONTEXT ...``  -> 400 with vLLM's context-length message
- ``BAD ...``      -> 400 with some other message
- ``ENDLESS ...``  -> a stream that never ends (records when the client leaves)
- ``response_format`` json_schema -> an object with every property set to the message
- a request with tools and tool_choice ``required`` or a named function, or a
  message starting ``CALL`` -> one tool call with ``{"query": <message>}``
- anything else    -> ``"echo: <message>"``
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "wire-test-model"
MAX_MODEL_LEN = 2048
CONTEXT_MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
    "(2000 in the messages, 100 in the completion). Please reduce the length of the messages "
    "or completion."
)


@dataclass
class WireState:
    requests: list[dict[str, Any]] = field(default_factory=list)
    endless_started: threading.Event = field(default_factory=threading.Event)
    endless_closed: threading.Event = field(default_factory=threading.Event)


def _last_user(body: dict[str, Any]) -> str:
    for message in reversed(body["messages"]):
        if message["role"] == "user":
            return str(message["content"])
    return ""


def _error(status: int, message: str) -> JSONResponse:
    body = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
    return JSONResponse(body, status_code=status)


def _tool_call_for(body: dict[str, Any], text: str) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    elif choice == "required" or text.startswith("CALL"):
        name = tools[0]["function"]["name"]
    else:
        return None
    return {"id": "call_wire_1", "name": name, "arguments": json.dumps({"query": text})}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> str:
    event = {
        "id": "chatcmpl-wire",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(event)}\n\n"


def build_app(state: WireState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "max_model_len": MAX_MODEL_LEN}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        state.requests.append(body)
        text = _last_user(body)
        if text.startswith("CONTEXT"):
            return _error(400, CONTEXT_MESSAGE)
        if text.startswith("BAD"):
            return _error(400, "temperature must be non-negative, got -3.0")
        call = _tool_call_for(body, text)
        content = "" if call else f"echo: {text}"
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema" and not call:
            # a constrained-decoding server answers in the schema: fill its string fields
            properties = response_format["json_schema"]["schema"].get("properties", {})
            content = json.dumps({key: text for key in properties})
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        completion_tokens = len(content.split()) + (3 if call else 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        finish = "tool_calls" if call else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if call:
                message["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]},
                    }
                ]
            return JSONResponse(
                {
                    "id": "chatcmpl-wire",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": MODEL,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            yield _chunk({"role": "assistant", "content": ""})
            if text.startswith("ENDLESS"):
                state.endless_started.set()
                try:
                    while True:
                        yield _chunk({"content": "more "})
                        await asyncio.sleep(0.02)
                finally:
                    state.endless_closed.set()
            if call:
                arguments = call["arguments"]
                third = max(1, len(arguments) // 3)
                pieces = [arguments[:third], arguments[third : 2 * third], arguments[2 * third :]]
                yield _chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["name"], "arguments": ""},
                            }
                        ]
                    }
                )
                for piece in pieces:
                    yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            else:
                for word in content.split(" "):
                    piece = word if word == content.split(" ")[-1] else word + " "
                    yield _chunk({"content": piece})
            yield _chunk({}, finish)
            if include_usage:
                event = {
                    "id": "chatcmpl-wire",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": MODEL,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """Runs a uvicorn server for an ASGI app on 127.0.0.1 in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=1,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"test server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
