"""Answer evaluation: ask the RAG answerer or the agent each question and score the answers.

Input is a JSONL file, one question per line::

    {"id": "q1", "question": "...", "answer": "..." | "answers": [...],
     "label": "yes", "gold_doc_ids": ["d3"], "contexts": ["..."]}

Accepted spellings: ``id``/``_id``/``qid``; ``question``/``query``;
``answer``/``answers``/``long_answer``/``reference``; ``label``/``final_decision``;
``gold_doc_ids``/``doc_ids``/``gold_ids``; ``context``/``contexts``. A line with a
``context`` but no gold ids (PubMedQA's shape) takes its own ``id`` as its gold
document: index the contexts with that id (``ragloom ingest qa.jsonl
--text-columns context --id-column id``) and citations are checked against it.

Per configuration (``rag`` or ``agent``) the run reports exact match, token F1,
label accuracy (closed label sets such as yes/no/maybe), citation precision and
recall, gold-document hit rate among the retrieved sources, refusal rate,
latency, errors, and optionally an LLM judge's faithfulness with the count of
unparseable verdicts (the judge's raw text is kept per question).

Example:
    >>> items = load_qa(Path("../shared/data/pubmedqa-dev/qa.jsonl"))
    >>> runner = AnswerEvalRunner(items, rag_answer_fn(answerer, recorder), name="rag")
    >>> write_report(runner.run(), Path("runs/pubmedqa-rag"))
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.answers import (
    DEFAULT_LABELS,
    JUDGE_SYSTEM_PROMPT,
    JudgeVerdict,
    citation_scores,
    exact_match,
    extract_label,
    is_refusal,
    judge_prompt,
    parse_judge_score,
    token_f1,
)
from eval.dataset import iter_lines, json_object, require_file
from eval.errors import DatasetError, EvalError
from eval.metrics import latency_summary
from eval.results import ConfigResult, RunResult, check_config_name

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


@dataclass(slots=True)
class QAItem:
    """One question to answer.

    Attributes:
        qid: Question id.
        question: The question text.
        references: Reference answers (may be empty when only a label is known).
        label: Closed-set label (``yes``/``no``/``maybe``...), if any.
        gold_doc_ids: Ids of the documents that support the answer.
        contexts: Gold context passages, if given (for the judge).
    """

    qid: str
    question: str
    references: list[str] = field(default_factory=list)
    label: str | None = None
    gold_doc_ids: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)


def _first(record: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    return None


def _strings(path: Path, number: int, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | int) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return [str(v) for v in value]
    raise DatasetError(path, f"field {key!r} must be a string or a list of strings", number)


def load_qa(path: Path) -> list[QAItem]:
    """Read a question file (JSONL); every problem names the file and line.

    Raises:
        DatasetError: missing file, bad JSON, no id, empty question, duplicate id,
            or a line with neither reference answer, label nor gold documents.
    """
    path = Path(path)
    require_file(path)
    items: list[QAItem] = []
    seen: set[str] = set()
    for number, line in iter_lines(path):
        record = json_object(path, number, line)
        raw_id = _first(record, ("id", "_id", "qid"))
        if raw_id is None or not str(raw_id).strip():
            raise DatasetError(path, "missing 'id'", number)
        qid = str(raw_id).strip()
        if qid in seen:
            raise DatasetError(path, f"duplicate id {qid!r}", number)
        seen.add(qid)
        question = _first(record, ("question", "query"))
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(path, f"question {qid!r} is empty or missing", number)
        references = _strings(
            path,
            number,
            "answer",
            _first(record, ("answers", "answer", "long_answer", "reference")),
        )
        label = _first(record, ("label", "final_decision"))
        if label is not None and not isinstance(label, str):
            raise DatasetError(path, f"label of {qid!r} must be a string", number)
        contexts = _strings(path, number, "context", _first(record, ("contexts", "context")))
        gold = _strings(
            path, number, "gold_doc_ids", _first(record, ("gold_doc_ids", "doc_ids", "gold_ids"))
        )
        if not gold and contexts:
            gold = [qid]  # PubMedQA shape: the item's own context is its gold document
        if not references and label is None and not gold:
            raise DatasetError(
                path, f"question {qid!r} has no reference answer, label or gold documents", number
            )
        items.append(
            QAItem(
                qid=qid,
                question=question.strip(),
                references=references,
                label=label.strip().lower() if isinstance(label, str) else None,
                gold_doc_ids=gold,
                contexts=contexts,
            )
        )
    if not items:
        raise DatasetError(path, "no questions in the file")
    return items


@dataclass(slots=True)
class AnswerOutcome:
    """What an answerer produced for one question.

    Attributes:
        text: The answer text.
        cited: One id set per cited document (its ids: corpus id, row id, doc id, source).
        retrieved: One id set per retrieved source document, best first.
        contexts: The source texts the answer was based on (for the judge).
        refused: The answerer's own refusal flag, when it has one (an answer also
            counts as refused when its text declines, see ``is_refusal``).
    """

    text: str
    cited: list[set[str]] = field(default_factory=list)
    retrieved: list[set[str]] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    refused: bool | None = None


AnswerFn = Callable[[str], Awaitable[AnswerOutcome]]
"""``async answer(question) -> AnswerOutcome``: the RAG answerer or the agent, adapted."""


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


class AnswerEvalRunner:
    """Answers every question with one answerer and scores the answers.

    Example:
        >>> runner = AnswerEvalRunner(load_qa(path), answer_fn, name="rag", judge=backend)
        >>> result = runner.run(progress=lambda stage, done, total: None)
        >>> result.metrics["rag"]["label_accuracy"], result.metrics["rag"]["judge_unparseable"]

    Args:
        items: The questions.
        answer_fn: ``async (question) -> AnswerOutcome``.
        name: Configuration name in reports (``rag``, ``agent``...).
        spec: Parameters to show in the report.
        judge: Optional ChatBackend grading faithfulness (1-5).
        labels: The closed label set; default yes/no/maybe when every label is in it,
            else the labels seen in the file.
        max_items: Answer only the first N questions.
        judge_max_tokens: Token budget of each judge reply.
    """

    def __init__(
        self,
        items: Sequence[QAItem],
        answer_fn: AnswerFn,
        *,
        name: str = "rag",
        spec: dict[str, Any] | None = None,
        judge: Any = None,
        labels: Sequence[str] | None = None,
        max_items: int | None = None,
        judge_max_tokens: int = 128,
    ) -> None:
        if not items:
            raise EvalError("no questions to evaluate")
        if max_items is not None and max_items < 1:
            raise EvalError(f"max_items must be >= 1, got {max_items}")
        self.name = check_config_name(name)
        self.items = list(items)[:max_items] if max_items else list(items)
        self.answer_fn = answer_fn
        self.spec = dict(spec or {})
        self.judge = judge
        self.judge_max_tokens = judge_max_tokens
        seen_labels = sorted({i.label for i in self.items if i.label is not None})
        if labels is not None:
            self.labels: tuple[str, ...] = tuple(label.lower() for label in labels)
        elif all(label in DEFAULT_LABELS for label in seen_labels):
            self.labels = DEFAULT_LABELS
        else:
            self.labels = tuple(seen_labels)

    def run(self, progress: ProgressCallback | None = None) -> RunResult:
        """Answer and score every question (blocking; runs its own event loop)."""
        return asyncio.run(self.arun(progress))

    async def _judge(self, item: QAItem, outcome: AnswerOutcome) -> JudgeVerdict:
        from llm_backend import ChatMessage, ChatRequest, SamplingOptions
        from llm_backend.errors import BackendError

        contexts = outcome.contexts or item.contexts
        request = ChatRequest(
            messages=[
                ChatMessage.system(JUDGE_SYSTEM_PROMPT),
                ChatMessage.user(judge_prompt(item.question, outcome.text, contexts)),
            ],
            sampling=SamplingOptions(temperature=0.0, max_tokens=self.judge_max_tokens),
        )
        try:
            response = await self.judge.chat(request)
        except BackendError as exc:
            return JudgeVerdict(None, "", f"judge call failed: {exc}")
        return parse_judge_score(response.content or "")

    async def arun(self, progress: ProgressCallback | None = None) -> RunResult:
        """The async form of :meth:`run`, for callers that already run an event loop."""
        started = time.perf_counter()
        stage = f"config:{self.name}"
        rows: list[dict[str, Any]] = []
        latencies: list[float] = []
        errors = 0
        for done, item in enumerate(self.items, start=1):
            began = time.perf_counter()
            try:
                outcome = await self.answer_fn(item.question)
            except Exception as exc:  # one failing question must not end the run
                errors += 1
                logger.warning("question %s failed: %s", item.qid, exc)
                rows.append({"qid": item.qid, "question": item.question, "error": str(exc)})
                if progress is not None:
                    progress(stage, done, len(self.items))
                continue
            latency = (time.perf_counter() - began) * 1000.0
            latencies.append(latency)
            row = self._score(item, outcome, latency)
            if self.judge is not None:
                verdict = await self._judge(item, outcome)
                row.update(
                    faithfulness=verdict.score, judge_raw=verdict.raw, judge_error=verdict.error
                )
            rows.append(row)
            if progress is not None:
                progress(stage, done, len(self.items))
        if errors == len(self.items):
            first = rows[0].get("error") if rows else "unknown"
            raise EvalError(f"every question failed; first error: {first}")
        metrics = self._aggregate(rows, latencies, errors)
        wall = time.perf_counter() - started
        config = ConfigResult(name=self.name, spec=self.spec, metrics=metrics, per_query=rows)
        return RunResult(
            kind="answers",
            configs=[config],
            info={
                "questions": len(self.items),
                "labels": "/".join(self.labels) if self.labels else None,
                "judge": getattr(self.judge, "name", None) if self.judge is not None else None,
            },
            wall_time_s=wall,
            baseline=self.name,
            distribution_metric="token_f1",
        )

    def _score(self, item: QAItem, outcome: AnswerOutcome, latency_ms: float) -> dict[str, Any]:
        refused = bool(outcome.refused) or is_refusal(outcome.text)
        row: dict[str, Any] = {
            "qid": item.qid,
            "question": item.question,
            "answer": outcome.text,
            "latency_ms": round(latency_ms, 3),
            "refused": refused,
            "exact_match": exact_match(outcome.text, item.references) if item.references else None,
            "token_f1": token_f1(outcome.text, item.references) if item.references else None,
        }
        if item.label is not None and self.labels:
            predicted = extract_label(outcome.text, self.labels)
            row.update(label=item.label, predicted_label=predicted)
            row["label_correct"] = float(predicted == item.label)
        if item.gold_doc_ids:
            gold = set(item.gold_doc_ids)
            scores = citation_scores(outcome.cited, gold)
            row.update(
                gold_doc_ids=item.gold_doc_ids,
                citation_precision=scores.precision,
                citation_recall=scores.recall,
                cited=scores.cited,
                gold_retrieved=float(any(ids & gold for ids in outcome.retrieved)),
            )
        return row

    def _aggregate(
        self, rows: list[dict[str, Any]], latencies: list[float], errors: int
    ) -> dict[str, float]:
        answered = [r for r in rows if "error" not in r]

        def values(key: str) -> list[float]:
            return [float(r[key]) for r in answered if isinstance(r.get(key), int | float)]

        metrics: dict[str, float] = {}
        for key, name in (
            ("exact_match", "exact_match"),
            ("token_f1", "token_f1"),
            ("label_correct", "label_accuracy"),
            ("citation_precision", "citation_precision"),
            ("citation_recall", "citation_recall"),
            ("gold_retrieved", "gold_hit_rate"),
        ):
            if values(key):
                metrics[name] = _mean(values(key))
        if any("label" in r for r in answered):
            labelled = [r for r in answered if "label" in r]
            unparsed = sum(1 for r in labelled if r.get("predicted_label") is None)
            metrics["label_unparsed_rate"] = unparsed / len(labelled)
        metrics["refusal_rate"] = _mean([float(bool(r["refused"])) for r in answered])
        if self.judge is not None:
            scored = values("faithfulness")
            if scored:
                metrics["faithfulness"] = _mean(scored)
            metrics["judge_parsed"] = float(len(scored))
            metrics["judge_unparseable"] = float(len(answered) - len(scored))
        metrics["num_questions"] = float(len(rows))
        metrics["num_errors"] = float(errors)
        metrics.update(latency_summary(latencies))
        return metrics


# -- adapters for the answerers in ``agents`` -------------------------------------------


def _ids_of(source: Any, recorded: dict[str, dict[str, Any]]) -> set[str]:
    """Every id a source's document is known by: its doc id, source, row/corpus id."""
    ids = {str(source.doc_id), str(source.source)}
    meta = recorded.get(str(source.chunk_id), {})
    for key in ("id", "corpus_id"):
        if meta.get(key) is not None:
            ids.add(str(meta[key]))
    return {i for i in ids if i}


def recording_retriever(inner: Any) -> Any:
    """Wrap a LangChain retriever so every returned chunk's metadata is remembered.

    Citations carry a document's hashed ``doc_id`` and source; the recorded
    metadata adds the ids a question file uses (a JSONL ``id`` column, a BEIR
    ``corpus_id``). ``recorder.records`` maps chunk id to metadata.
    """
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict, Field

    class RecordingRetriever(BaseRetriever):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        inner: Any
        k: int = 5
        records: dict[str, dict[str, Any]] = Field(default_factory=dict)

        def _get_relevant_documents(
            self, query: str, *, run_manager: CallbackManagerForRetrieverRun
        ) -> list[Document]:
            retriever = self.inner
            if "k" in type(retriever).model_fields and getattr(retriever, "k", None) != self.k:
                retriever = retriever.model_copy(update={"k": self.k})
            documents = list(retriever.invoke(query))[: self.k]
            for doc in documents:
                chunk_id = str(doc.metadata.get("chunk_id") or doc.id or "")
                self.records[chunk_id] = dict(doc.metadata)
            return documents

    return RecordingRetriever(inner=inner, k=int(getattr(inner, "k", 5)), records={})


def rag_answer_fn(answerer: Any, recorder: Any) -> AnswerFn:
    """Adapt an ``agents.RagAnswerer`` built on ``recorder`` (see :func:`recording_retriever`)."""

    async def answer(question: str) -> AnswerOutcome:
        result = await answerer.answer(question)
        return AnswerOutcome(
            text=result.answer,
            cited=_unique_docs([_ids_of(c, recorder.records) for c in result.citations]),
            retrieved=_unique_docs([_ids_of(s, recorder.records) for s in result.sources]),
            contexts=[s.text for s in result.sources],
            refused=bool(result.refused),
        )

    return answer


def agent_answer_fn(agent: Any, recorder: Any) -> AnswerFn:
    """Adapt an ``agents.ToolAgent`` whose knowledge-base tool searches ``recorder``."""

    async def answer(question: str) -> AnswerOutcome:
        result = await agent.run(question)
        return AnswerOutcome(
            text=result.answer,
            cited=_unique_docs([_ids_of(c, recorder.records) for c in result.citations]),
            retrieved=_unique_docs([_ids_of(s, recorder.records) for s in result.sources]),
            contexts=[s.text for s in result.sources],
        )

    return answer


def _unique_docs(id_sets: list[set[str]]) -> list[set[str]]:
    """Merge id sets that share an id (several chunks of one document)."""
    merged: list[set[str]] = []
    for ids in id_sets:
        for existing in merged:
            if existing & ids:
                existing |= ids
                break
        else:
            merged.append(set(ids))
    return merged
