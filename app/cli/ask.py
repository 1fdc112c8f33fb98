"""CLI command: ``ragloom ask "question" --collection NAME --mode rag|agent [--json]``.

Streams the answer to stdout, then its citations (and, in agent mode, the tool
trace); ``--json`` prints one object instead. The LLM backend comes from the
settings (``RAGLOOM_AGENT__BACKEND``) or ``--backend``: ``engine`` runs our
engine in-process on ``settings.engine.model``; ``openai`` talks to any
OpenAI-compatible server at ``--base-url``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.cli._common import fail, load_settings
from app.services.wiring import build_backend, open_retriever

if TYPE_CHECKING:
    from agents import AgentResult, RagAnswer, Source
    from app.settings import Settings
    from llm_backend import ChatBackend
    from retrieval import HybridRetriever


class AskMode(StrEnum):
    """How to answer."""

    rag = "rag"
    agent = "agent"


class BackendKind(StrEnum):
    """Which LLM backend answers."""

    engine = "engine"
    openai = "openai"


class RetrievalMode(StrEnum):
    """Which retriever side(s) to use."""

    hybrid = "hybrid"
    dense = "dense"
    bm25 = "bm25"


AGENT_TOOLS = ["knowledge_base_search", "calculator", "current_datetime", "web_search"]

web_client_factory: Callable[[float], Any] | None = None
"""Makes the ddgs client of ``web_search`` (None: the real ddgs); tests set a failing one."""


def _source_json(source: Source) -> dict[str, Any]:
    out = asdict(source)
    out["snippet"] = source.snippet
    del out["text"]
    return out


def _print_sources(title: str, items: list[dict[str, Any]]) -> None:
    typer.echo(f"\n{title}:")
    for item in items:
        where = ", ".join(
            str(part)
            for part in (
                item["source"],
                f"page {item['page']}" if item.get("page") is not None else None,
                item.get("section"),
            )
            if part
        )
        typer.echo(f"  [{item['number']}] {item['title']} ({where})")
        typer.echo(f"      {item['snippet'][:160]}")


async def _run(
    *,
    question: str,
    mode: str,
    retriever: HybridRetriever,
    backend: ChatBackend,
    settings: Settings,
    json_output: bool,
) -> dict[str, Any]:
    from agents import (
        AgentProfile,
        DoneEvent,
        RagAnswerer,
        RagConfig,
        TokenEvent,
        ToolAgent,
        ToolCallEvent,
        ToolResultEvent,
        default_registry,
    )
    from llm_backend import ChatBackendModel, SamplingOptions

    config = settings.agent
    done: Any = None
    if mode == AskMode.rag:
        answerer = RagAnswerer(
            retriever,
            backend,
            RagConfig(
                k=retriever.k,
                min_score=config.min_score,
                on_low_score=config.on_low_score,
                max_answer_tokens=config.max_answer_tokens,
            ),
        )
        events: Any = answerer.stream(question)
    else:
        registry = default_registry(
            retriever, ddgs_factory=web_client_factory, web_timeout_s=config.web_timeout_s
        )
        profile = AgentProfile(
            name="cli",
            tools=AGENT_TOOLS,
            max_steps=config.max_steps,
            tool_timeout_s=config.tool_timeout_s,
            max_tool_output_chars=config.max_tool_output_chars,
            require_tool_first=True,
        )
        # the backend's default sampling: tool calls are grammar-constrained there
        model = ChatBackendModel(
            backend=backend, sampling=SamplingOptions(max_tokens=config.max_answer_tokens)
        )
        events = ToolAgent(model, registry, profile).stream(question)

    async for event in events:
        if isinstance(event, TokenEvent) and not json_output:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, ToolCallEvent) and not json_output:
            typer.echo(f"\n[tool call] {event.name} {json.dumps(event.arguments)}", err=True)
        elif isinstance(event, ToolResultEvent) and not json_output:
            status = "error" if event.error else "ok"
            typer.echo(f"[tool {status}] {event.result[:200]}", err=True)
        elif isinstance(event, DoneEvent):
            done = event.answer
    return _result_json(question, mode, done)


def _result_json(question: str, mode: str, done: RagAnswer | AgentResult) -> dict[str, Any]:
    from agents import RagAnswer

    citations = [asdict(c) for c in done.citations]
    sources = [_source_json(s) for s in done.sources]
    out: dict[str, Any] = {
        "question": question,
        "mode": mode,
        "answer": done.answer,
        "citations": citations,
        "sources": sources,
        "tool_calls": [],
    }
    if isinstance(done, RagAnswer):
        out.update(
            refused=done.refused,
            rewritten_query=done.rewritten_query,
            timings=asdict(done.timings),
            usage=asdict(done.usage) if done.usage else None,
        )
    else:
        out.update(
            tool_calls=[
                {
                    "name": t.name,
                    "arguments": t.arguments,
                    "result": t.result,
                    "error": t.error,
                }
                for t in done.tool_calls
            ],
            steps=done.steps,
            stopped_by_limit=done.stopped_by_limit,
            timings={"total_ms": done.total_ms},
        )
    return out


def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Collection to search.")],
    mode: Annotated[AskMode, typer.Option(help="rag: retrieve and answer; agent: use tools.")] = (
        AskMode.rag
    ),
    backend: Annotated[
        BackendKind | None, typer.Option(help="LLM backend (default: settings).")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="OpenAI-compatible server URL.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model: served name (openai) or registry name/GGUF path.")
    ] = None,
    k: Annotated[int | None, typer.Option("-k", help="Chunks to retrieve.")] = None,
    retrieval: Annotated[RetrievalMode, typer.Option(help="Retriever mode.")] = (
        RetrievalMode.hybrid
    ),
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer a question over a collection, with citations (and a tool trace in agent mode)."""
    from llm_backend.engine.errors import EngineError
    from llm_backend.errors import BackendError
    from retrieval import RetrievalError

    if not question.strip():
        fail("the question is empty")
    settings = load_settings(fresh=False)
    top_k = settings.agent.k if k is None else k
    if top_k < 1:
        fail(f"-k must be >= 1, got {top_k}")
    try:
        retriever = open_retriever(settings, collection, top_k, retrieval.value)
    except RetrievalError as exc:
        fail(str(exc))
    except ValueError as exc:  # pydantic validation of the retriever's fields
        fail(f"cannot open collection {collection!r}: {exc}")
    kind = (backend or BackendKind(settings.agent.backend)).value
    try:
        chat_backend = build_backend(settings, kind, base_url, model)
    except (BackendError, EngineError, OSError, ValueError) as exc:
        fail(f"cannot start the {kind} backend: {exc}")

    async def main() -> dict[str, Any]:
        # no health probe first: a refused question needs no LLM, and an unreachable
        # backend fails fast with BackendUnavailable naming its URL
        return await _run(
            question=question,
            mode=mode.value,
            retriever=retriever,
            backend=chat_backend,
            settings=settings,
            json_output=json_output,
        )

    try:
        result = asyncio.run(main())
    except BackendError as exc:
        fail(str(exc))
    except RetrievalError as exc:
        fail(str(exc))
    finally:
        close = getattr(chat_backend, "close", None)
        if callable(close):
            close()  # stops an in-process engine

    if json_output:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    typer.echo("")
    if result["citations"]:
        _print_sources("Citations", result["citations"])
    elif result["sources"]:
        _print_sources("Sources (not cited in the answer)", result["sources"])
    if result["tool_calls"]:
        typer.echo("\nTool calls:")
        for number, call in enumerate(result["tool_calls"], start=1):
            flag = " (error)" if call["error"] else ""
            typer.echo(f"  {number}. {call['name']}({json.dumps(call['arguments'])}){flag}")
            typer.echo(f"      -> {(call['result'] or '')[:200]}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("ask")(ask)
