"""The tool-using agent: LangChain's agent runtime plus ragloom's guards.

The loop is LangChain's ``create_agent`` (model -> tools -> model ...) over any
chat model with ``bind_tools`` (in ragloom, ``llm_backend.ChatBackendModel``
over a ``ChatBackend``). One middleware, :class:`_AgentGuard`, adds what the
profile promises:

- **allow-list**: only the profile's tools are offered to the model, and a tool
  call naming any other tool is refused (an error tool result; the tool never
  runs), whatever instructions a document or tool output contained;
- **bounded steps**: at most ``max_steps`` model calls, then a clear final message;
- **per-tool timeout**: a tool that does not answer in ``tool_timeout_s`` gives
  an error tool result and the agent carries on;
- **failures become results**: any exception from a tool is an error tool result;
- **output budget**: tool output is cut to ``max_tool_output_chars``;
- **citations**: passages returned by ``knowledge_base_search`` are numbered
  across the whole run, so ``[n]`` in the final answer maps to one passage.

Every tool call and result is streamed as an event for the API and the UI.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest
from langchain.agents.middleware.types import ModelResponse, hook_config
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command

from agents.errors import AgentError
from agents.events import DoneEvent, TokenEvent, ToolCallEvent, ToolResultEvent
from agents.prompts import AGENT_SYSTEM_PROMPT, INVALID_TOOL_CALL_MESSAGE, MAX_STEPS_MESSAGE
from agents.sources import Citation, Source, format_sources, resolve_citations
from agents.tools import ToolRegistry
from llm_backend.types import ChatMessage

logger = logging.getLogger(__name__)

AgentEvent = TokenEvent | ToolCallEvent | ToolResultEvent | DoneEvent

_KB_PASSAGE_CHARS = 600


@dataclass(slots=True)
class AgentProfile:
    """What an agent may do: its tools (an allow-list), prompt and limits.

    Attributes:
        name: Profile name (shown in refusals and logs).
        tools: Names of the registry tools this agent may call; nothing else runs.
        system_prompt: The agent's instructions.
        max_steps: Most model calls in one run (each tool round is one step).
        tool_timeout_s: Bound on one tool call, in seconds.
        max_tool_output_chars: Tool output beyond this is cut before the model sees it.
        require_tool_first: Force a tool call on the first step (``tool_choice="required"``);
            useful for small models that otherwise answer from memory.
        max_history_messages: Most earlier-turn messages passed to the model.
    """

    name: str
    tools: list[str]
    system_prompt: str = AGENT_SYSTEM_PROMPT
    max_steps: int = 6
    tool_timeout_s: float = 20.0
    max_tool_output_chars: int = 4000
    require_tool_first: bool = False
    max_history_messages: int = 10

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an agent profile needs a name")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.tool_timeout_s <= 0:
            raise ValueError(f"tool_timeout_s must be > 0, got {self.tool_timeout_s}")
        if self.max_tool_output_chars < 100:
            raise ValueError(
                f"max_tool_output_chars must be >= 100, got {self.max_tool_output_chars}"
            )
        if self.require_tool_first and not self.tools:
            raise ValueError("require_tool_first needs at least one tool in the profile")


@dataclass(slots=True)
class ToolTrace:
    """One tool call of a run and its result."""

    name: str
    arguments: dict[str, Any]
    id: str
    result: str | None = None
    error: bool = False


@dataclass(slots=True)
class AgentResult:
    """The outcome of one agent run.

    Attributes:
        answer: The final answer text (or the step-limit message).
        tool_calls: Every tool call the model made, with its result, in order.
        citations: Valid ``[n]`` citations of knowledge-base passages in the answer.
        sources: Every knowledge-base passage the agent saw, numbered across the run.
        steps: Model calls made.
        stopped_by_limit: True when ``max_steps`` ended the run.
        total_ms: Wall time of the run.
    """

    answer: str
    tool_calls: list[ToolTrace]
    citations: list[Citation]
    sources: list[Source]
    steps: int
    stopped_by_limit: bool
    total_ms: float = 0.0


@dataclass(slots=True)
class _RunState:
    """Per-run bookkeeping shared by the guard and the event stream."""

    sources: list[Source] = field(default_factory=list)
    steps: int = 0
    stopped_by_limit: bool = False


def _steps_since_question(messages: Sequence[AnyMessage]) -> int:
    steps = 0
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            break
        if isinstance(message, AIMessage):
            steps += 1
    return steps


class _AgentGuard(AgentMiddleware):
    """Enforces an :class:`AgentProfile` on LangChain's agent loop."""

    def __init__(self, profile: AgentProfile, run: _RunState) -> None:
        super().__init__()
        self.profile = profile
        self.run = run
        self.allowed = frozenset(profile.tools)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        steps = _steps_since_question(state["messages"])
        if steps >= self.profile.max_steps:
            self.run.stopped_by_limit = True
            message = MAX_STEPS_MESSAGE.format(steps=steps, max_steps=self.profile.max_steps)
            logger.info("agent %r stopped at max_steps=%d", self.profile.name, steps)
            return {"jump_to": "end", "messages": [AIMessage(content=message)]}
        return None

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any]:
        self.run.steps += 1
        first_step = _steps_since_question(request.messages) == 0
        if self.profile.require_tool_first and first_step and request.tools:
            request = request.override(tool_choice="required")
        return await handler(request)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        call = request.tool_call
        name, call_id = call["name"], call["id"] or ""
        if name not in self.allowed:
            logger.warning(
                "agent %r: refused call of %r (not in its allow-list)", self.profile.name, name
            )
            return self._error(
                call_id,
                name,
                f"tool {name!r} is not allowed for agent {self.profile.name!r}; "
                f"allowed tools: {', '.join(sorted(self.allowed)) or 'none'}",
            )
        try:
            result = await asyncio.wait_for(handler(request), timeout=self.profile.tool_timeout_s)
        except TimeoutError:
            logger.warning("tool %r timed out after %.1f s", name, self.profile.tool_timeout_s)
            return self._error(
                call_id, name, f"tool {name!r} timed out after {self.profile.tool_timeout_s:g} s"
            )
        except Exception as exc:  # a failing tool becomes a tool result, never a crash
            logger.warning("tool %r failed: %s", name, exc)
            return self._error(call_id, name, f"tool {name!r} failed: {exc}")
        if not isinstance(result, ToolMessage):
            return result
        if isinstance(result.artifact, list) and all(
            isinstance(s, Source) for s in result.artifact
        ):
            result = self._renumber(result, cast(list[Source], result.artifact))
        return self._truncate(result)

    def _renumber(self, message: ToolMessage, found: list[Source]) -> ToolMessage:
        """Number knowledge-base passages across the run (a passage seen before keeps its n)."""
        if not found:
            return message
        by_chunk = {s.chunk_id: s for s in self.run.sources}
        shown: list[Source] = []
        for source in found:
            known = by_chunk.get(source.chunk_id)
            if known is None:
                known = _with_number(source, len(self.run.sources) + 1)
                self.run.sources.append(known)
                by_chunk[known.chunk_id] = known
            shown.append(known)
        return message.model_copy(
            update={"content": format_sources(shown, _KB_PASSAGE_CHARS), "artifact": shown}
        )

    def _truncate(self, message: ToolMessage) -> ToolMessage:
        content = message.content if isinstance(message.content, str) else str(message.content)
        limit = self.profile.max_tool_output_chars
        if len(content) <= limit:
            return message
        cut = content[:limit] + f"\n[... truncated {len(content) - limit} characters]"
        return message.model_copy(update={"content": cut})

    @staticmethod
    def _error(call_id: str, name: str, text: str) -> ToolMessage:
        return ToolMessage(content=text, tool_call_id=call_id, name=name, status="error")


def _with_number(source: Source, number: int) -> Source:
    return replace(source, number=number)


def _to_langchain(history: Sequence[ChatMessage]) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for message in history:
        if message.role == "user" and message.content:
            out.append(HumanMessage(content=message.content))
        elif message.role == "assistant" and message.content:
            out.append(AIMessage(content=message.content))
    return out


def _text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = [p if isinstance(p, str) else str(p.get("text", "")) for p in content]
    return "".join(parts)


class ToolAgent:
    """Answers by calling tools in a bounded loop, streaming every step.

    Example:
        >>> registry = default_registry(retriever=retriever)
        >>> profile = AgentProfile("support", tools=["knowledge_base_search", "calculator"])
        >>> agent = ToolAgent(ChatBackendModel(backend=backend), registry, profile)
        >>> result = await agent.run("What does the Pro plan cost for 3 seats?")
        >>> [(t.name, t.result) for t in result.tool_calls], result.answer
    """

    def __init__(self, model: BaseChatModel, registry: ToolRegistry, profile: AgentProfile) -> None:
        """Check the profile's tools exist in ``registry``.

        Raises:
            ToolRegistryError: the profile names a tool the registry does not have.
        """
        self.model = model
        self.profile = profile
        self.tools = registry.select(profile.tools)

    async def run(self, question: str, history: Sequence[ChatMessage] = ()) -> AgentResult:
        """Run to the end and return the result (see :meth:`stream`)."""
        result: AgentResult | None = None
        async for event in self.stream(question, history):
            if isinstance(event, DoneEvent):
                result = event.answer
        if result is None:  # stream() always ends with DoneEvent
            raise AgentError("the agent stream ended without a DoneEvent")
        return result

    async def stream(
        self, question: str, history: Sequence[ChatMessage] = ()
    ) -> AsyncIterator[AgentEvent]:
        """Run the agent on ``question``, yielding events as they happen.

        Order: for each step, the model's ``TokenEvent``s, then a
        ``ToolCallEvent`` per requested call, then a ``ToolResultEvent`` per call;
        finally ``DoneEvent(AgentResult)``.

        Raises:
            ValueError: the question is empty.
            llm_backend.errors.BackendError: the model backend failed.
        """
        if not question or not question.strip():
            raise ValueError("question is empty")
        started = time.perf_counter()
        run = _RunState()
        graph = create_agent(
            self.model,
            self.tools,
            system_prompt=self.profile.system_prompt,
            middleware=[_AgentGuard(self.profile, run)],
            name=f"agent-{self.profile.name}",
        )
        kept = list(history)[-self.profile.max_history_messages :] if history else []
        messages = [*_to_langchain(kept), HumanMessage(content=question.strip())]
        traces: dict[str, ToolTrace] = {}
        order: list[str] = []
        final_text = ""
        streamed_ids: set[str] = set()
        # a backstop: the guard ends the run after max_steps model calls
        config: RunnableConfig = {"recursion_limit": 4 * self.profile.max_steps + 10}
        agent_input: Any = {"messages": messages}

        # with a list of stream modes, each item is a (mode, data) pair
        parts = cast(
            AsyncIterator[tuple[str, Any]],
            graph.astream(agent_input, config=config, stream_mode=["messages", "updates"]),
        )
        async for mode, data in parts:
            if mode == "messages":
                chunk, metadata = cast(tuple[BaseMessage, dict[str, Any]], data)
                if isinstance(chunk, AIMessageChunk) and metadata.get("langgraph_node") == "model":
                    text = _text_of(chunk)
                    if text:
                        if chunk.id:
                            streamed_ids.add(chunk.id)
                        yield TokenEvent(text)
                continue
            for node_update in _node_updates(data):
                for message in node_update:
                    if isinstance(message, AIMessage):
                        text = _text_of(message)
                        if text and message.id not in streamed_ids:
                            yield TokenEvent(text)  # not streamed (a guard's message)
                        final_text = text
                        for call in message.tool_calls:
                            call_id = call["id"] or f"call-{len(order)}"
                            traces[call_id] = ToolTrace(call["name"], dict(call["args"]), call_id)
                            order.append(call_id)
                            yield ToolCallEvent(call["name"], dict(call["args"]), call_id)
                        for bad in message.invalid_tool_calls:
                            # arguments that are not JSON: nothing runs; LangChain ends
                            # the loop, so report it and say so in the answer
                            call_id = bad.get("id") or f"call-{len(order)}"
                            name = bad.get("name") or ""
                            raw = {"raw_arguments": bad.get("args")}
                            reason = f"invalid tool call: {bad.get('error') or 'bad arguments'}"
                            traces[call_id] = ToolTrace(name, raw, call_id, reason, True)
                            order.append(call_id)
                            yield ToolCallEvent(name, raw, call_id)
                            yield ToolResultEvent(name, reason, call_id, True)
                            if not final_text:
                                final_text = INVALID_TOOL_CALL_MESSAGE
                                yield TokenEvent(final_text)
                    elif isinstance(message, ToolMessage):
                        result_text = _text_of(message)
                        error = message.status == "error"
                        trace = traces.get(message.tool_call_id)
                        if trace is not None:
                            trace.result, trace.error = result_text, error
                        name = message.name or (trace.name if trace else "")
                        yield ToolResultEvent(name, result_text, message.tool_call_id, error)

        citations, unknown = resolve_citations(final_text, run.sources)
        if unknown:
            logger.info("agent answer cited unknown passages %s (dropped)", unknown)
        yield DoneEvent(
            AgentResult(
                answer=final_text,
                tool_calls=[traces[i] for i in order],
                citations=citations,
                sources=list(run.sources),
                steps=run.steps,
                stopped_by_limit=run.stopped_by_limit,
                total_ms=(time.perf_counter() - started) * 1000.0,
            )
        )


def _node_updates(data: Any) -> list[list[Any]]:
    """The message lists inside one ``updates`` stream item (``{node: {"messages": [...]}}``)."""
    out: list[list[Any]] = []
    if not isinstance(data, dict):
        return out
    for update in data.values():
        updates = update if isinstance(update, list) else [update]
        for item in updates:
            if isinstance(item, dict) and isinstance(item.get("messages"), list):
                out.append(item["messages"])
    return out
