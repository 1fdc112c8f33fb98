"""Answer evaluation over a real collection (MiniLM, Chroma, BM25) and the real RAG answerer.

The LLM is a scripted backend: these tests check the eval layer's wiring and
arithmetic (labels, citations against gold documents, refusals, judge parsing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eval.answer_runner import (
    AnswerEvalRunner,
    AnswerOutcome,
    load_qa,
    rag_answer_fn,
    recording_retriever,
)
from eval.errors import DatasetError, EvalError
from eval.report import render_report, write_report
from eval.results import load_run

ITEMS = [
    {
        "id": "101",
        "question": "Does regular aspirin use lower the risk of colorectal cancer?",
        "context": "In a cohort of 40,000 adults, regular aspirin use was associated with a "
        "lower incidence of colorectal cancer over ten years.",
        "long_answer": "Regular aspirin use lowers colorectal cancer risk.",
        "label": "yes",
    },
    {
        "id": "102",
        "question": "Does vitamin C prevent the common cold in adults?",
        "context": "A randomised trial of vitamin C supplements in adults found no reduction "
        "in the number of common colds compared with placebo.",
        "long_answer": "Vitamin C does not prevent colds.",
        "label": "no",
    },
    {
        "id": "103",
        "question": "Is coffee drinking linked to longer sleep latency in teenagers?",
        "context": "Among teenagers, evening coffee drinking showed an inconsistent association "
        "with the time taken to fall asleep; results differed by school.",
        "long_answer": "The link between coffee and sleep latency is unclear.",
        "label": "maybe",
    },
]


def _write_qa(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from retrieval import Ingestor, SentenceTransformerEmbedder
    from retrieval.ingest import default_loader
    from retrieval.loaders import TableOptions

    root = tmp_path_factory.mktemp("answers")
    qa = _write_qa(root / "qa.jsonl", ITEMS)
    data_dir = root / "data"
    table = TableOptions(text_columns=["context"], id_column="id", title_column="question")
    ingestor = Ingestor(
        data_dir, embedder=SentenceTransformerEmbedder(), loader=default_loader(table=table)
    )
    report = ingestor.ingest([qa], collection="pubmed-mini")
    ingestor.close()
    assert report.ok, report.summary()
    return qa, data_dir


def _answer_from_prompt(request: Any) -> Any:
    """Answer as a model would from the prompt: the label of the first source, citing [1]."""
    from llm_backend import ChatResponse

    prompt = request.messages[-1].content or ""
    if "vitamin" in prompt.lower().split("question")[-1]:
        return ChatResponse("I don't know.")  # a refusal, counted as such
    if "coffee" in prompt.lower().split("question")[-1]:
        return ChatResponse("Yes, coffee matters [2].")  # wrong label, cites source 2
    return ChatResponse("Yes. Aspirin use lowers colorectal cancer risk [1].")


@pytest.mark.slow
@pytest.mark.integration
def test_rag_run_scores_labels_citations_refusals_and_judge(
    collection: tuple[Path, Path], tmp_path: Path
) -> None:
    from agents import RagAnswerer, RagConfig
    from llm_backend import ChatResponse
    from llm_backend.scripted import ScriptedBackend
    from retrieval import HybridRetriever

    qa, data_dir = collection
    items = load_qa(qa)
    assert [i.gold_doc_ids for i in items] == [["101"], ["102"], ["103"]]
    recorder = recording_retriever(HybridRetriever.from_data_dir(data_dir, "pubmed-mini", k=2))
    backend = ScriptedBackend([_answer_from_prompt] * 3)
    answerer = RagAnswerer(recorder, backend, RagConfig(k=2, min_score=0.0))
    judge = ScriptedBackend(
        [ChatResponse('{"score": 5}'), ChatResponse("looks fine"), ChatResponse("Score: 3")]
    )
    runner = AnswerEvalRunner(items, rag_answer_fn(answerer, recorder), name="rag", judge=judge)
    events: list[tuple[str, int, int]] = []
    result = runner.run(progress=lambda *e: events.append(e))
    metrics = result.metrics["rag"]

    assert events[-1] == ("config:rag", 3, 3)
    # labels: 101 yes (right), 102 refusal -> no label, 103 "yes" vs maybe (wrong)
    assert metrics["label_accuracy"] == pytest.approx(1 / 3)
    assert metrics["label_unparsed_rate"] == pytest.approx(1 / 3)
    assert metrics["refusal_rate"] == pytest.approx(1 / 3)
    rows = {r["qid"]: r for r in result.configs[0].per_query}
    # 101 cites [1], the best source for its own question: its own context
    assert rows["101"]["citation_precision"] == 1.0 and rows["101"]["citation_recall"] == 1.0
    assert rows["102"]["citation_precision"] is None and rows["102"]["citation_recall"] == 0.0
    # every question's own context is retrieved among the top 2
    assert metrics["gold_hit_rate"] == 1.0
    # the judge: 5 -> 1.0, unparseable, 3 -> 0.5; the raw text is kept
    assert metrics["judge_unparseable"] == 1 and metrics["judge_parsed"] == 2
    assert metrics["faithfulness"] == pytest.approx(0.75)
    assert rows["102"]["judge_raw"] == "looks fine" and rows["102"]["faithfulness"] is None
    assert rows["102"]["judge_error"] == "no score found in the reply"
    assert 0 < metrics["token_f1"] < 1

    out = tmp_path / "run"
    write_report(result, out)
    assert load_run(out).kind == "answers"
    assert (out / "per_query_distribution.png").is_file()
    assert "| `rag` |" in render_report(result)


def test_question_failures_are_counted_not_fatal() -> None:
    from eval.answer_runner import QAItem

    async def flaky(question: str) -> AnswerOutcome:
        if "boom" in question:
            raise RuntimeError("backend down")
        return AnswerOutcome(text="Paris")

    items = [QAItem("1", "capital of France?", ["Paris"]), QAItem("2", "boom?", ["x"])]
    metrics = AnswerEvalRunner(items, flaky, name="rag").run().metrics["rag"]
    assert metrics["num_errors"] == 1 and metrics["exact_match"] == 1.0
    with pytest.raises(EvalError, match="every question failed; first error: backend down"):
        AnswerEvalRunner([items[1]], flaky).run()


def test_load_qa_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    _write_qa(path, [ITEMS[0], {"id": "x", "question": "  ", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"qa\.jsonl:2: question 'x' is empty"):
        load_qa(path)
    _write_qa(path, [ITEMS[0], ITEMS[0]])
    with pytest.raises(DatasetError, match=r"qa\.jsonl:2: duplicate id '101'"):
        load_qa(path)
    _write_qa(path, [{"id": "q", "question": "why?"}])
    with pytest.raises(DatasetError, match=r":1: question 'q' has no reference answer"):
        load_qa(path)
    path.write_text('{"id": 1, "question": "q", "answers": ["a", "b"], "gold_doc_ids": [7]}\r\n')
    item = load_qa(path)[0]
    assert (item.qid, item.references, item.gold_doc_ids) == ("1", ["a", "b"], ["7"])
    with pytest.raises(DatasetError, match="file not found"):
        load_qa(tmp_path / "none.jsonl")


def test_real_pubmedqa_file_loads() -> None:
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "pubmedqa-dev" / "qa.jsonl"
    if not path.is_file():
        path = Path("/work/shared/data/pubmedqa-dev/qa.jsonl")
    items = load_qa(path)
    assert len(items) == 500
    labels = [i.label for i in items]
    assert (labels.count("yes"), labels.count("no"), labels.count("maybe")) == (276, 169, 55)
    assert all(i.gold_doc_ids == [i.qid] and i.references for i in items)
    assert all(re.fullmatch(r"\d+", i.qid) for i in items)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_answers_against_loopback_openai_server(
    collection: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ragloom eval answers`` end to end: real retriever, real OpenAI client over HTTP.

    The loopback server echoes the prompt back, so the "answer" cites every source
    number it was shown: with k=2 that is the question's own context plus one other.
    """
    from typer.testing import CliRunner

    from app.cli import app
    from tests.llm_backend.wire_server import MODEL, ServerThread, WireState, build_app

    qa, data_dir = collection
    monkeypatch.setenv("RAGLOOM_DATA_DIR", str(data_dir))
    monkeypatch.setenv("RAGLOOM_AGENT__MIN_SCORE", "0")
    out = tmp_path / "answers"
    state = WireState()
    with ServerThread(build_app(state)) as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        args = ["eval", "answers", "--qa", str(qa), "--collection", "pubmed-mini"]
        args += ["--mode", "rag", "--out", str(out), "--backend", "openai", "--base-url", url]
        args += ["--model", MODEL, "-k", "2", "--no-progress", "--judge"]
        result = CliRunner().invoke(app, [*args, "--fail-below", "gold_hit_rate=1.0"])
        assert result.exit_code == 0, result.stderr
        gated = CliRunner().invoke(app, [*args, "--fail-below", "label_accuracy=0.99"])
    assert gated.exit_code == 3 and "gate failed: rag: label_accuracy" in gated.stderr

    metrics = json.loads((out / "metrics.json").read_text())["rag"]
    assert metrics["num_questions"] == 3 and metrics["num_errors"] == 0
    assert metrics["gold_hit_rate"] == 1.0
    assert metrics["citation_recall"] == 1.0
    assert metrics["citation_precision"] == pytest.approx(0.5)
    # the judge (the same echo server) never gives a score: every verdict is unparseable
    assert metrics["judge_unparseable"] == 3 and "faithfulness" not in metrics
    rows = [json.loads(line) for line in (out / "per_query.jsonl").read_text().splitlines()]
    assert all(r["judge_raw"].startswith("echo: QUESTION: ") for r in rows)
    assert (out / "report.md").is_file() and (out / "metrics.png").is_file()
    # 3 answers + 3 judge calls per run, two runs
    assert len(state.requests) == 12

    bad = CliRunner().invoke(
        app,
        [
            "eval",
            "answers",
            "--qa",
            str(tmp_path / "none.jsonl"),
            "-c",
            "pubmed-mini",
            "--out",
            str(out),
        ],
    )
    assert bad.exit_code == 1 and "none.jsonl: file not found" in bad.stderr
    missing = CliRunner().invoke(
        app,
        ["eval", "answers", "--qa", str(qa), "-c", "no-such-collection", "--out", str(out)],
    )
    assert missing.exit_code == 1 and "no-such-collection" in missing.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_agent_mode_citations_map_to_gold_ids(collection: tuple[Path, Path]) -> None:
    """The agent adapter: knowledge-base hits are recorded, citations scored against gold ids."""
    from agents import AgentProfile, ToolAgent, default_registry
    from eval.answer_runner import agent_answer_fn
    from llm_backend import ChatBackendModel, ChatResponse, ToolCall
    from llm_backend.scripted import ScriptedBackend
    from retrieval import HybridRetriever

    qa, data_dir = collection
    items = [i for i in load_qa(qa) if i.qid == "101"]
    recorder = recording_retriever(HybridRetriever.from_data_dir(data_dir, "pubmed-mini", k=2))
    backend = ScriptedBackend(
        [
            ChatResponse(
                "",
                [ToolCall("c1", "knowledge_base_search", '{"query": "aspirin colorectal cancer"}')],
                "tool_calls",
            ),
            ChatResponse("Yes, regular aspirin use lowers the risk [1]."),
        ]
    )
    profile = AgentProfile("eval", tools=["knowledge_base_search"], max_steps=3)
    agent = ToolAgent(ChatBackendModel(backend=backend), default_registry(recorder), profile)
    result = AnswerEvalRunner(items, agent_answer_fn(agent, recorder), name="agent").run()
    row = result.configs[0].per_query[0]
    assert row["predicted_label"] == "yes" and row["label_correct"] == 1.0
    assert row["citation_precision"] == 1.0 and row["citation_recall"] == 1.0
    assert row["gold_retrieved"] == 1.0
    assert result.metrics["agent"]["refusal_rate"] == 0.0
