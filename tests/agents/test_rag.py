"""The RAG chain on a scripted backend: prompt, citations, refusal, history, rewrite, events."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document

from agents.events import CitationsEvent, DoneEvent, TokenEvent
from agents.rag import RagAnswer, RagAnswerer, RagConfig, clean_rewrite
from llm_backend import ChatMessage, ChatRequest, ChatResponse, SamplingOptions, ScriptedBackend
from llm_backend.errors import BackendUnavailable, ContextTooLong
from tests.agents.conftest import ListRetriever, doc


def answerer_for(
    docs: list[Document], responses: list[ChatResponse], **config: object
) -> tuple[RagAnswerer, ScriptedBackend, ListRetriever]:
    backend = ScriptedBackend(responses, chunk_size=3)
    retriever = ListRetriever(documents=docs)
    return RagAnswerer(retriever, backend, RagConfig(**config)), backend, retriever  # type: ignore[arg-type]


async def test_answer_cites_sources_and_events_come_in_order(three_docs: list[Document]) -> None:
    answerer, backend, retriever = answerer_for(
        three_docs, [ChatResponse("Refunds take 5 days [1]. Pro costs 12 EUR [2, 7].")]
    )
    events = [event async for event in answerer.stream("How long do refunds take?")]

    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) > 1  # streamed in pieces
    assert isinstance(events[-2], CitationsEvent) and isinstance(events[-1], DoneEvent)
    assert all(isinstance(e, TokenEvent) for e in events[:-2])
    result = events[-1].answer
    assert isinstance(result, RagAnswer)
    assert "".join(t.text for t in tokens) == result.answer
    assert [c.doc_id for c in result.citations] == ["doc1", "doc2"]
    assert events[-2].citations == result.citations
    assert result.unknown_citations == [7]
    assert [s.number for s in result.sources] == [1, 2, 3]
    assert not result.refused and result.rewritten_query is None
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.timings.ttft_ms is not None
    assert result.timings.total_ms >= result.timings.ttft_ms
    assert retriever.queries == ["How long do refunds take?"]

    [request] = backend.requests
    system, user = request.messages
    assert system.role == "system" and "[1]" in (system.content or "")
    assert user.content is not None
    assert user.content.startswith("Sources:\n\n[1] Doc 1 (/data/doc1.md, page 2)\nRefunds")
    assert "[2] Doc 2 (/data/doc2.md, Pricing > Pro)" in user.content
    assert user.content.endswith("Question: How long do refunds take?")
    assert request.sampling.max_tokens == 256


async def test_answer_without_citations_invents_none_but_returns_sources(
    three_docs: list[Document],
) -> None:
    answerer, _, _ = answerer_for(three_docs, [ChatResponse("Five business days.")])
    result = await answerer.answer("How long do refunds take?")
    assert result.citations == [] and result.unknown_citations == []
    assert [s.doc_id for s in result.sources] == ["doc1", "doc2", "doc3"]


async def test_low_dense_score_refuses_without_calling_the_llm() -> None:
    docs = [doc("Unrelated text about gardening.", 1, dense=0.12), doc("Cats.", 2, dense=0.05)]
    answerer, backend, _ = answerer_for(docs, [])
    events = [e async for e in answerer.stream("What is the refund policy?")]
    result = events[-1].answer
    assert result.refused
    assert result.answer == "The documents do not contain an answer to this question."
    assert [type(e) for e in events] == [TokenEvent, CitationsEvent, DoneEvent]
    assert result.best_score == pytest.approx(0.12)
    assert backend.requests == []  # no LLM call
    assert len(result.sources) == 2  # still shown to the caller


async def test_low_score_answer_anyway_calls_the_llm() -> None:
    docs = [doc("Unrelated.", 1, dense=0.1)]
    answerer, backend, _ = answerer_for(
        docs, [ChatResponse("I am not sure.")], on_low_score="answer"
    )
    result = await answerer.answer("What is the refund policy?")
    assert not result.refused and result.answer == "I am not sure."
    assert len(backend.requests) == 1


async def test_threshold_on_fused_score_and_skipped_without_dense_scores() -> None:
    bm25_only = [doc("Refunds in 5 days.", 1, dense=None)]
    answerer, backend, _ = answerer_for(bm25_only, [ChatResponse("5 days [1].")], min_score=0.9)
    assert not (await answerer.answer("refunds?")).refused  # no cosine: no check

    answerer, backend, _ = answerer_for(bm25_only, [], score_field="score", min_score=0.5)
    result = await answerer.answer("refunds?")  # fused score 1/61 < 0.5
    assert result.refused and backend.requests == []


async def test_nothing_retrieved_refuses() -> None:
    answerer, backend, _ = answerer_for([], [])
    result = await answerer.answer("anything?")
    assert result.refused and "nothing was found" in result.answer and result.sources == []
    assert backend.requests == []


async def test_follow_up_is_rewritten_before_retrieval(three_docs: list[Document]) -> None:
    answerer, backend, retriever = answerer_for(
        three_docs,
        [ChatResponse("Query: How much does the Pro plan cost?\n"), ChatResponse("12 EUR [2].")],
    )
    history = [
        ChatMessage.user("Tell me about the Pro plan."),
        ChatMessage.assistant("The Pro plan is for teams [2]."),
    ]
    result = await answerer.answer("How much does it cost?", history)
    assert result.rewritten_query == "How much does the Pro plan cost?"
    assert retriever.queries == ["How much does the Pro plan cost?"]
    rewrite_request, answer_request = backend.requests
    assert rewrite_request.sampling.max_tokens == 64
    assert "Tell me about the Pro plan." in (rewrite_request.messages[-1].content or "")
    # the answer prompt keeps the history and asks the user's own question
    roles = [m.role for m in answer_request.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert (answer_request.messages[-1].content or "").endswith("Question: How much does it cost?")
    assert [c.doc_id for c in result.citations] == ["doc2"]


async def test_answer_uses_the_config_sampling_and_the_rewrite_stays_greedy(
    three_docs: list[Document],
) -> None:
    sampling = SamplingOptions(
        top_p=0.9, top_k=40, min_p=0.05, seed=7, presence_penalty=0.5, repetition_penalty=1.3
    )
    answerer, backend, _ = answerer_for(
        three_docs,
        [ChatResponse("How much does the Pro plan cost?"), ChatResponse("12 EUR [2].")],
        max_answer_tokens=100,
        sampling=sampling,
    )
    history = [ChatMessage.user("The Pro plan?"), ChatMessage.assistant("For teams [2].")]
    await answerer.answer("How much does it cost?", history)
    rewrite_request, answer_request = backend.requests
    # the answer: every option of the config's sampling, greedy (temperature unset there)
    assert answer_request.sampling == SamplingOptions(
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        max_tokens=100,
        seed=7,
        presence_penalty=0.5,
        repetition_penalty=1.3,
    )
    # the rewrite: deterministic and unpenalized whatever the answer uses
    assert rewrite_request.sampling == SamplingOptions(temperature=0.0, max_tokens=64)


def test_config_sampling_temperature_wins_and_budget_conflicts_are_refused() -> None:
    config = RagConfig(temperature=0.2, sampling=SamplingOptions(temperature=0.8))
    assert config.answer_sampling().temperature == 0.8
    assert RagConfig(temperature=0.2).answer_sampling().temperature == 0.2
    same = RagConfig(max_answer_tokens=64, sampling=SamplingOptions(max_tokens=64))
    assert same.answer_sampling().max_tokens == 64
    with pytest.raises(ValueError, match=r"sampling\.max_tokens \(32\) differs"):
        RagConfig(max_answer_tokens=64, sampling=SamplingOptions(max_tokens=32))


@pytest.mark.parametrize("reply", ["", "   \n", "???", "...\n!!!"])
async def test_garbage_rewrite_falls_back_to_the_question(
    three_docs: list[Document], reply: str
) -> None:
    answerer, _, retriever = answerer_for(three_docs, [ChatResponse(reply), ChatResponse("ok")])
    result = await answerer.answer(
        "and then?", [ChatMessage.user("hi"), ChatMessage.assistant("hello")]
    )
    assert result.rewritten_query is None
    assert retriever.queries == ["and then?"]


async def test_no_rewrite_without_history(three_docs: list[Document]) -> None:
    answerer, backend, _ = answerer_for(three_docs, [ChatResponse("ok")])
    await answerer.answer("How much does it cost?")
    assert len(backend.requests) == 1


def test_clean_rewrite() -> None:
    assert clean_rewrite('"pro plan price"', "q") == "pro plan price"
    assert clean_rewrite("\nStandalone query: pro plan price\nextra", "q") == "pro plan price"
    assert clean_rewrite("x" * 500, "short question") is None
    assert clean_rewrite("12345", "q") is None


async def test_history_is_trimmed_to_the_context_window_oldest_first(
    three_docs: list[Document],
) -> None:
    long_turn = "blah " * 200  # ~250 tokens each
    history = []
    for i in range(6):
        history += [ChatMessage.user(f"question {i} {long_turn}"), ChatMessage.assistant(f"a{i}")]
    backend = ScriptedBackend(
        [ChatResponse("rewritten"), ChatResponse("5 days [1].")], context_window=1100
    )
    answerer = RagAnswerer(ListRetriever(documents=three_docs), backend, RagConfig())
    result = await answerer.answer("How long do refunds take?", history)

    request = backend.requests[-1]
    assert backend.count_tokens(request.messages) + 256 <= 1100
    assert request.messages[0].content == answerer.config.system_prompt
    assert (request.messages[-1].content or "").endswith("Question: How long do refunds take?")
    kept_history = [m.content for m in request.messages[1:-1]]
    assert 0 < len(kept_history) < len(history)
    # the newest turns are the ones kept, whole
    assert kept_history == [m.content for m in history[-len(kept_history) :]]
    assert [s.number for s in result.sources] == [1, 2, 3]  # all sources still fit


async def test_sources_are_dropped_lowest_first_when_history_is_gone() -> None:
    docs = [doc(f"passage {i} " + "word " * 150, i) for i in range(1, 6)]  # ~190 tokens each
    backend = ScriptedBackend([ChatResponse("ok [1]")], context_window=900)
    answerer = RagAnswerer(ListRetriever(documents=docs), backend, RagConfig(k=5))
    await answerer.answer("What do the passages say?")
    content = backend.requests[0].messages[-1].content or ""
    assert "[1] Doc 1" in content and "[5] Doc 5" not in content
    assert backend.count_tokens(backend.requests[0].messages) + 256 <= 900


async def test_question_too_long_for_the_window_is_context_too_long(
    three_docs: list[Document],
) -> None:
    backend = ScriptedBackend([], context_window=300)
    answerer = RagAnswerer(ListRetriever(documents=three_docs), backend, RagConfig())
    with pytest.raises(ContextTooLong):
        await answerer.answer("why " * 400)


async def test_backend_down_during_answer_raises_backend_unavailable(
    three_docs: list[Document],
) -> None:
    def down(request: ChatRequest) -> ChatResponse:
        raise BackendUnavailable("scripted", "http://127.0.0.1:9", "connection refused")

    answerer, _, _ = answerer_for(three_docs, [down])
    with pytest.raises(BackendUnavailable, match="connection refused"):
        await answerer.answer("How long do refunds take?")


async def test_empty_question_and_bad_config_are_refused(three_docs: list[Document]) -> None:
    answerer, _, _ = answerer_for(three_docs, [])
    with pytest.raises(ValueError, match="question is empty"):
        await answerer.answer("   ")
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        RagConfig(k=0)
    with pytest.raises(ValueError, match="on_low_score"):
        RagConfig(on_low_score="maybe")  # type: ignore[arg-type]
