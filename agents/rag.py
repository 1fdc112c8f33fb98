"""The plain RAG chain: retrieve, prompt with numbered sources, stream a cited answer.

Steps of one question:

1. With conversation history, the question is first rewritten into a stand-alone
   search query (one short LLM call; the raw question is used when the rewrite
   comes back empty or unusable).
2. The retriever returns the top-k chunks, numbered ``[1]..[k]`` as sources.
3. If the best retrieval score is under ``min_score`` the answer says the
   documents do not contain it, without calling the LLM (``on_low_score="refuse"``).
   The score compared is the **dense (cosine) score** of the chunks by default
   (``score_field="dense_score"``): cosine similarity has an absolute meaning,
   while a fused reciprocal-rank score only orders results. The default
   threshold, 0.25, suits all-MiniLM-L6-v2, whose cosine for an unrelated
   passage sits around 0.0-0.15 and for a relevant one above 0.3. When no chunk
   carries that score (BM25-only retrieval), the check is skipped.
4. The prompt (system prompt, history, sources, question) is fitted to the
   context window (history goes first, then the tail of the sources; never the
   system prompt or the question), and the answer streams back.
5. The citations ``[n]`` in the answer are checked against the sources given:
   unknown numbers are dropped, each kept one is mapped to its document. An
   answer without any valid citation gets none (none are invented); the
   sources list is returned separately either way.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from langchain_core.retrievers import BaseRetriever

from agents.errors import AgentError
from agents.events import CitationsEvent, DoneEvent, TokenEvent
from agents.prompts import (
    NO_DOCUMENTS_MESSAGE,
    RAG_SYSTEM_PROMPT,
    RAG_USER_TEMPLATE,
    REFUSAL_MESSAGE,
    REWRITE_SYSTEM_PROMPT,
    REWRITE_USER_TEMPLATE,
)
from agents.sources import (
    Citation,
    Source,
    aretrieve,
    format_source,
    format_sources,
    resolve_citations,
    sources_from_documents,
)
from llm_backend.context import fit_to_context
from llm_backend.errors import BackendError
from llm_backend.protocol import ChatBackend
from llm_backend.types import ChatMessage, ChatRequest, SamplingOptions, Usage

logger = logging.getLogger(__name__)

RagEvent = TokenEvent | CitationsEvent | DoneEvent

_REWRITE_PREFIX = re.compile(
    r"^\s*(?:stand-?alone\s+)?(?:search\s+)?(?:query|question|rewritten(?:\s+question)?)\s*:\s*",
    re.IGNORECASE,
)
_HISTORY_LINES_FOR_REWRITE = 6
_HISTORY_CHARS_FOR_REWRITE = 400


@dataclass(slots=True)
class RagConfig:
    """Settings of a :class:`RagAnswerer`.

    Attributes:
        k: Chunks to retrieve and show the model.
        min_score: Refusal threshold on ``score_field`` of the best chunk.
        score_field: Metadata score compared with ``min_score``: ``"dense_score"``
            (cosine, the default) or ``"score"`` (the retriever's own score).
        on_low_score: ``"refuse"`` (answer that the documents do not contain it,
            no LLM call) or ``"answer"`` (answer anyway).
        rewrite_follow_ups: Rewrite a question asked after history into a
            stand-alone query before retrieval.
        max_answer_tokens: Output budget of the answer (the answer's ``max_tokens``).
        temperature: Sampling temperature of the answer (0 = greedy) when
            ``sampling`` leaves it unset.
        sampling: The answer's other sampling options (``top_p``, ``top_k``,
            ``min_p``, penalties, ``seed``; its ``temperature`` wins over
            ``temperature`` when set). Its ``max_tokens`` must be unset or equal
            ``max_answer_tokens``. The follow-up rewrite ignores it and stays greedy.
        max_source_chars: Each source's text is cut to this many characters.
        system_prompt: The answerer's instructions.
        refusal_message: What a refused answer says.
    """

    k: int = 5
    min_score: float = 0.25
    score_field: Literal["dense_score", "score"] = "dense_score"
    on_low_score: Literal["refuse", "answer"] = "refuse"
    rewrite_follow_ups: bool = True
    max_answer_tokens: int = 256
    temperature: float = 0.0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_source_chars: int = 1200
    system_prompt: str = RAG_SYSTEM_PROMPT
    refusal_message: str = REFUSAL_MESSAGE

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.score_field not in ("dense_score", "score"):
            raise ValueError(
                f"score_field must be 'dense_score' or 'score', got {self.score_field!r}"
            )
        if self.on_low_score not in ("refuse", "answer"):
            raise ValueError(
                f"on_low_score must be 'refuse' or 'answer', got {self.on_low_score!r}"
            )
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if self.sampling.max_tokens not in (None, self.max_answer_tokens):
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) differs from "
                f"max_answer_tokens ({self.max_answer_tokens}); set the budget there"
            )
        if self.max_source_chars < 50:
            raise ValueError(f"max_source_chars must be >= 50, got {self.max_source_chars}")

    def answer_sampling(self) -> SamplingOptions:
        """The answer call's options: ``sampling`` with the temperature and budget filled in."""
        temperature = self.sampling.temperature
        return replace(
            self.sampling,
            temperature=self.temperature if temperature is None else temperature,
            max_tokens=self.max_answer_tokens,
        )


@dataclass(slots=True)
class RagTimings:
    """Milliseconds spent on one question.

    Attributes:
        rewrite_ms: The follow-up rewrite call (0 when there was none).
        retrieval_ms: The retriever call.
        ttft_ms: From the start of the question to the first answer token (what a
            user waits); None when refused or nothing was generated.
        total_ms: The whole question.
    """

    rewrite_ms: float = 0.0
    retrieval_ms: float = 0.0
    ttft_ms: float | None = None
    total_ms: float = 0.0


@dataclass(slots=True)
class RagAnswer:
    """The result of one question.

    Attributes:
        answer: The answer text as generated (or the refusal message).
        citations: Valid citations in order of first use; empty when the answer
            cites nothing valid.
        sources: Every source given to the model (show these when there are no citations).
        rewritten_query: The stand-alone query used for retrieval, when the
            question was rewritten; else None.
        refused: True when the answer was the refusal (low score or nothing found).
        usage: Token counts of the answer call, when the backend reports them.
        timings: Where the time went.
        unknown_citations: Numbers cited that named no source (dropped).
        best_score: The best ``score_field`` value among the sources, if any.
        finish_reason: The backend's finish reason (``stop``/``length``), None when refused.
    """

    answer: str
    citations: list[Citation]
    sources: list[Source]
    rewritten_query: str | None
    refused: bool
    usage: Usage | None
    timings: RagTimings
    unknown_citations: list[int] = field(default_factory=list)
    best_score: float | None = None
    finish_reason: str | None = None


class RagAnswerer:
    """Answers questions over a retriever with numbered, checked citations.

    Example:
        >>> answerer = RagAnswerer(retriever, backend, RagConfig(k=4))
        >>> result = await answerer.answer("How do I reset my password?")
        >>> result.answer, [c.source for c in result.citations]
        >>> async for event in answerer.stream("And on mobile?", history=turns):
        ...     if isinstance(event, TokenEvent): print(event.text, end="")
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        backend: ChatBackend,
        config: RagConfig | None = None,
    ) -> None:
        self.retriever = retriever
        self.backend = backend
        self.config = config or RagConfig()

    async def answer(self, question: str, history: Sequence[ChatMessage] = ()) -> RagAnswer:
        """Answer ``question`` in one piece (see :meth:`stream`)."""
        result: RagAnswer | None = None
        async for event in self.stream(question, history):
            if isinstance(event, DoneEvent):
                result = event.answer
        if result is None:  # stream() always ends with DoneEvent
            raise AgentError("the RAG stream ended without a DoneEvent")
        return result

    async def stream(
        self, question: str, history: Sequence[ChatMessage] = ()
    ) -> AsyncIterator[RagEvent]:
        """Answer ``question``: ``TokenEvent``s, then one ``CitationsEvent``, then ``DoneEvent``.

        Args:
            question: The user's latest question.
            history: Earlier turns (``user``/``assistant`` messages), oldest first.

        Raises:
            ValueError: the question is empty.
            llm_backend.errors.BackendError: the backend failed while answering.
        """
        if not question or not question.strip():
            raise ValueError("question is empty")
        question = question.strip()
        config = self.config
        timings = RagTimings()
        started = time.perf_counter()

        query, rewritten = question, None
        if history and config.rewrite_follow_ups:
            t0 = time.perf_counter()
            rewritten = await self.rewrite_query(question, history)
            timings.rewrite_ms = _ms_since(t0)
            query = rewritten or question

        t0 = time.perf_counter()
        sources = sources_from_documents(await aretrieve(self.retriever, query, config.k))
        timings.retrieval_ms = _ms_since(t0)
        best = best_score(sources, config.score_field)
        logger.debug(
            "retrieved %d sources for %r, best %s=%s", len(sources), query, config.score_field, best
        )

        refusal = self._refusal(sources, best)
        if refusal is not None:
            timings.total_ms = _ms_since(started)
            yield TokenEvent(refusal)
            yield CitationsEvent([])
            yield DoneEvent(
                RagAnswer(refusal, [], sources, rewritten, True, None, timings, best_score=best)
            )
            return

        messages = self._messages(question, history, sources)
        request = ChatRequest(messages, sampling=config.answer_sampling())
        parts: list[str] = []
        usage: Usage | None = None
        finish_reason: str | None = None
        async for chunk in self.backend.stream(request):
            if chunk.delta:
                if timings.ttft_ms is None:
                    timings.ttft_ms = _ms_since(started)
                parts.append(chunk.delta)
                yield TokenEvent(chunk.delta)
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.finish_reason is not None:
                finish_reason = chunk.finish_reason
        text = "".join(parts)
        citations, unknown = resolve_citations(text, sources)
        if unknown:
            logger.info("dropped citations %s: only %d sources were given", unknown, len(sources))
        timings.total_ms = _ms_since(started)
        yield CitationsEvent(citations)
        yield DoneEvent(
            RagAnswer(
                answer=text,
                citations=citations,
                sources=sources,
                rewritten_query=rewritten,
                refused=False,
                usage=usage,
                timings=timings,
                unknown_citations=unknown,
                best_score=best,
                finish_reason=finish_reason,
            )
        )

    async def rewrite_query(self, question: str, history: Sequence[ChatMessage]) -> str | None:
        """A stand-alone version of ``question`` given ``history``, or None if unusable.

        A backend failure here is logged and answered with None (the raw
        question is then used); the answer call reports the failure properly.
        """
        lines = []
        for message in list(history)[-_HISTORY_LINES_FOR_REWRITE:]:
            if message.role in ("user", "assistant") and message.content:
                text = " ".join(message.content.split())[:_HISTORY_CHARS_FOR_REWRITE]
                lines.append(f"{message.role}: {text}")
        if not lines:
            return None
        request = ChatRequest(
            [
                ChatMessage.system(REWRITE_SYSTEM_PROMPT),
                ChatMessage.user(
                    REWRITE_USER_TEMPLATE.format(conversation="\n".join(lines), question=question)
                ),
            ],
            # greedy and unpenalized whatever the answer uses: the query must be stable
            sampling=SamplingOptions(temperature=0.0, max_tokens=64),
        )
        try:
            response = await self.backend.chat(request)
        except BackendError as exc:
            logger.warning("query rewrite failed, using the question as is: %s", exc)
            return None
        rewritten = clean_rewrite(response.content, question)
        logger.debug("rewrote %r -> %r", question, rewritten)
        return rewritten

    def _refusal(self, sources: list[Source], best: float | None) -> str | None:
        if not sources:
            return NO_DOCUMENTS_MESSAGE
        config = self.config
        if config.on_low_score == "refuse" and best is not None and best < config.min_score:
            logger.info("best %s %.3f < %.3f: refusing", config.score_field, best, config.min_score)
            return self.config.refusal_message
        return None

    def _messages(
        self, question: str, history: Sequence[ChatMessage], sources: list[Source]
    ) -> list[ChatMessage]:
        """System prompt, the history that fits, and one user message with sources + question.

        ``fit_to_context`` decides what fits on a layout with one message per
        source (so it can drop the lowest-ranked sources one by one after the
        oldest history); the kept sources are then merged into the final user
        message, which costs no more tokens than the separate messages did.
        """
        config = self.config
        turns = [m for m in history if m.role in ("user", "assistant") and m.content]
        system = ChatMessage.system(config.system_prompt)
        source_messages = [
            ChatMessage.user(format_source(s, config.max_source_chars)) for s in sources
        ]
        question_message = ChatMessage.user(RAG_USER_TEMPLATE.format(sources="", question=question))
        layout = [system, *turns, *source_messages, question_message]
        first_source = 1 + len(turns)
        fitted = fit_to_context(
            layout,
            count_tokens=self.backend.count_tokens,
            context_window=self.backend.context_window,
            reserve_for_output=config.max_answer_tokens,
            retrieved=range(first_source, first_source + len(sources)),
        )
        kept_ids = {id(m) for m in fitted.messages}
        kept_turns = [m for m in turns if id(m) in kept_ids]
        dropped = {i - first_source for i in fitted.dropped_retrieved}
        kept_sources = [s for i, s in enumerate(sources) if i not in dropped]
        body = RAG_USER_TEMPLATE.format(
            sources=format_sources(kept_sources, config.max_source_chars) or "(none)",
            question=question,
        )
        return [system, *kept_turns, ChatMessage.user(body)]


def best_score(sources: Sequence[Source], score_field: str) -> float | None:
    """The highest ``score_field`` value among ``sources``, or None if none has one."""
    values = [getattr(s, score_field) for s in sources if getattr(s, score_field) is not None]
    return max(values) if values else None


def clean_rewrite(text: str, question: str) -> str | None:
    """The usable query in a rewrite reply, or None when it is empty or garbage.

    Takes the first non-empty line, strips a ``Query:`` prefix and quotes, and
    refuses results without letters, or implausibly long (> 3x the question plus
    200 characters).
    """
    for line in text.splitlines():
        candidate = _REWRITE_PREFIX.sub("", line).strip().strip("\"'`").strip()
        if candidate:
            break
    else:
        return None
    if not any(ch.isalpha() for ch in candidate):
        return None
    if len(candidate) > 3 * len(question) + 200:
        return None
    return candidate


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
