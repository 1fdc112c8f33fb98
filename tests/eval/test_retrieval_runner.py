"""Full retrieval runs on a small BEIR folder: real MiniLM, real Chroma and BM25, real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from eval.configs import parse_config
from eval.dataset import load_beir
from eval.errors import EvalError
from eval.index import CORPUS_ID_FIELD
from eval.results import RunResult, load_run
from eval.retrieval_runner import RetrievalEvalRunner, chunks_to_documents
from tests.eval.beir_fixtures import DOCS, QRELS, QUERIES, write_beir

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LONG_DOC = (
    "Bicycles",
    " ".join(
        f"In year {1817 + i} riders in town number {i} preferred wooden frames and iron tyres."
        for i in range(12)
    )
    + " Much later the derailleur gear let cyclists change ratios while pedalling uphill.",
)
DOCS_WITH_LONG = {**DOCS, "d13": LONG_DOC}
QUERIES_WITH_LONG = {**QUERIES, "q7": "derailleur gear for cycling uphill"}
QRELS_WITH_LONG = [*QRELS, ("q7", "d13", 1)]
CONFIGS = [
    "bm25=bm25",
    "dense=dense",
    "hyb=hybrid,bm25_weight=0.6,dense_weight=0.4",
    "small=hybrid,chunk_size=32,chunk_overlap=4,k=5",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("beir") / "tiny"
    return write_beir(
        root, crlf=True, docs=DOCS_WITH_LONG, queries=QUERIES_WITH_LONG, qrels=QRELS_WITH_LONG
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cold_run(dataset_dir: Path, cache_dir: Path) -> tuple[RunResult, list[tuple[str, int, int]]]:
    events: list[tuple[str, int, int]] = []
    configs = [parse_config(c) for c in CONFIGS]
    result = RetrievalEvalRunner(dataset_dir, configs, cache_dir, split="test").run(
        progress=lambda stage, done, total: events.append((stage, done, total))
    )
    return result, events


def test_cold_run_scores_every_configuration(
    cold_run: tuple[RunResult, list[tuple[str, int, int]]],
) -> None:
    result, events = cold_run
    assert list(result.metrics) == ["bm25", "dense", "hyb", "small"]
    assert result.info["index_cache"] == "cold"
    assert result.info["indexes"] == 2  # chunk_size=32 needs its own index
    assert result.info["queries"] == 6  # q6 has no judgements in the split
    for name, metrics in result.metrics.items():
        assert metrics["ndcg@10"] > 0.8, name  # easy, distinct topics
        assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"]
    # progress reached the end of every stage
    finals = {stage: (done, total) for stage, done, total in events}
    assert finals["config:bm25"] == (6, 6)
    assert all(done == total for done, total in finals.values())


def test_chunks_map_back_to_corpus_ids(
    cold_run: tuple[RunResult, list[tuple[str, int, int]]],
) -> None:
    result, _ = cold_run
    small = result.config("small")
    assert small.run is not None
    chunk_counts = [i["chunks"] for i in result.info["index_details"]]
    assert max(chunk_counts) > len(DOCS_WITH_LONG)  # the long doc split into chunks
    for qid, docs in small.run.items():
        assert set(docs) <= set(DOCS_WITH_LONG), qid
        assert len(docs) <= 5  # k=5 documents, not chunks
    # the relevant sentence sits in a late chunk of d13, yet the document is found first
    assert next(iter(sorted(small.run["q7"].items(), key=lambda x: -x[1])))[0] == "d13"
    row = next(r for r in small.per_query if r["qid"] == "q7")
    assert row["top"][0] == "d13" and row["relevant"] == ["d13"]
    assert row["mrr@10"] == 1.0


def test_warm_cache_skips_embedding_and_gives_same_results(
    cold_run: tuple[RunResult, list[tuple[str, int, int]]], dataset_dir: Path, cache_dir: Path
) -> None:
    cold, _ = cold_run
    embedded: list[int] = []

    def counting_embedder(model: str) -> object:
        from retrieval import SentenceTransformerEmbedder

        class Counting(SentenceTransformerEmbedder):
            def embed_documents(self, texts):  # type: ignore[no-untyped-def]
                embedded.append(len(texts))
                return super().embed_documents(texts)

        return Counting(model)

    configs = [parse_config(c) for c in CONFIGS[:3]]
    warm = RetrievalEvalRunner(
        dataset_dir, configs, cache_dir, embedder_factory=counting_embedder
    ).run()
    assert warm.info["index_cache"] == "warm"
    assert embedded == []  # no document embedded again
    for name in ("bm25", "dense", "hyb"):
        assert warm.config(name).run == cold.config(name).run
        assert warm.metrics[name]["ndcg@10"] == cold.metrics[name]["ndcg@10"]


def test_changed_corpus_gets_a_new_index(tmp_path: Path, cache_dir: Path) -> None:
    docs = dict(DOCS)
    docs["d3"] = ("Honey bees", "Bees turn flower nectar into honey inside the hive.")
    root = write_beir(tmp_path / "changed", docs=docs)
    result = RetrievalEvalRunner(root, [parse_config("bm25=bm25")], cache_dir).run()
    assert result.info["index_cache"] == "cold"


def test_chunks_to_documents_keeps_best_chunk_and_order() -> None:
    hits = [("a", 0.9), ("b", 0.9), ("a", 0.8), ("c", 0.5), ("b", 0.4), ("d", 0.1)]
    docs = chunks_to_documents(hits, k=3)
    assert list(docs) == ["a", "b", "c"]
    assert docs["a"] == 0.9
    # equal chunk scores stay in the retriever's order for trec_eval (ties by id would flip)
    assert docs["a"] > docs["b"] > docs["c"]


def test_missing_reranker_fails_with_clear_error(dataset_dir: Path, cache_dir: Path) -> None:
    config = parse_config("rr=bm25,rerank=true,reranker_model=/nonexistent/cross-encoder")
    with pytest.raises(EvalError, match="/nonexistent/cross-encoder"):
        RetrievalEvalRunner(dataset_dir, [config], cache_dir).run()


def test_index_metadata_carries_corpus_ids(
    cold_run: tuple[RunResult, list[tuple[str, int, int]]],
) -> None:
    from retrieval import HybridRetriever

    result, _ = cold_run
    path = Path(result.info["index_details"][0]["path"])
    chunks = HybridRetriever.from_data_dir(path, "beir-corpus", k=3, mode="bm25").search(
        "volcano lava"
    )
    assert chunks[0].metadata[CORPUS_ID_FIELD] == "d2"
    assert chunks[0].text.startswith("Volcanoes")  # title + text are indexed


# -- the command line ----------------------------------------------------------------


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_cli_run_writes_folder_and_gates(
    dataset_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = ["eval", "retrieval", "--dataset", str(dataset_dir), "--split", "test"]
    base += ["--config", "hyb=hybrid,bm25_weight=0.6", "--config", "bm25=bm25"]
    base += ["--cache-dir", str(cache_dir), "--no-progress", "--baseline", "bm25"]
    code, stdout, stderr = _invoke(*base, "--out", str(out), "--fail-below", "ndcg@10=0.5")
    assert code == 0, stderr
    assert "all 1 gates passed" in stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"hyb", "bm25"}
    assert {"ndcg@10", "recall@100", "mrr@10", "map"} <= set(metrics["hyb"])
    for name in ("per_query.jsonl", "runs/hyb.trec", "runs/bm25.trec", "report.md"):
        assert (out / name).is_file(), name
    for name in ("metrics.png", "per_query_distribution.png", "recall_curve.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Delta against baseline `bm25`" in (out / "report.md").read_text()

    code, _, stderr = _invoke(*base, "--out", str(tmp_path / "r2"), "--fail-below", "map=1.01")
    assert code == 3
    assert "gate failed: hyb: map" in stderr and "gate failed: bm25: map" in stderr

    code, _, stderr = _invoke(
        *base, "--out", str(tmp_path / "r3"), "--baseline-run", str(out), "--max-queries", "3"
    )
    assert code == 0, stderr
    comparison = (tmp_path / "r3" / "comparison.md").read_text()
    assert "## `hyb`" in comparison and "of 3 queries" in comparison
    assert json.loads((tmp_path / "r3" / "run.json").read_text())["info"]["queries"] == 3

    code, stdout, _ = _invoke("eval", "compare", str(out), str(tmp_path / "r2"))
    assert code == 0
    assert "## `hyb`" in stdout and "| ndcg@10 |" in stdout
    assert load_run(out).baseline == "bm25"


def test_cli_bad_inputs_give_one_line_errors(dataset_dir: Path, tmp_path: Path) -> None:
    bad = write_beir(tmp_path / "bad", qrels=[("q1", "d1", 1), ("q2", "nowhere", 1)])
    code, _, stderr = _invoke(
        "eval", "retrieval", "--dataset", str(bad), "--config", "b=bm25", "--out", str(tmp_path)
    )
    assert code == 1
    assert stderr.startswith("error: ") and "test.tsv:3: document id 'nowhere'" in stderr
    assert "Traceback" not in stderr

    code, _, stderr = _invoke(
        "eval",
        "retrieval",
        "--dataset",
        str(dataset_dir),
        "--config",
        "b=bm25,k=x",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1 and "k must be a whole number" in stderr

    code, _, stderr = _invoke(
        "eval",
        "retrieval",
        "--dataset",
        str(dataset_dir),
        "--config",
        "b=bm25",
        "--out",
        str(tmp_path / "o"),
        "--fail-below",
        "ndcg@10",
    )
    assert code == 1 and "METRIC=THRESHOLD" in stderr

    code, _, stderr = _invoke("eval", "compare", str(tmp_path / "x"), str(tmp_path / "y"))
    assert code == 1 and "run folder not found" in stderr


class _LengthReranker:
    """A deterministic stand-in cross-encoder: shorter passages score higher.

    No cross-encoder model ships offline here; this checks the eval layer's rerank
    plumbing (only the head is rescored, the tail stays below it, documents follow).
    """

    def __init__(self) -> None:
        self.calls: list[int] = []

    def warm_up(self) -> None:
        return None

    def score(self, query: str, passages: list[str]) -> list[float]:
        self.calls.append(len(passages))
        return [-float(len(p)) for p in passages]


def test_rerank_rescores_only_the_head(dataset_dir: Path, cache_dir: Path) -> None:
    reranker = _LengthReranker()
    configs = [parse_config("rr=hybrid,rerank=true,rerank_top=3,k=10,fetch_k=20")]
    result = RetrievalEvalRunner(
        dataset_dir, configs, cache_dir, reranker_factory=lambda name: reranker
    ).run()
    run = result.config("rr").run
    assert run is not None
    assert set(reranker.calls) == {3}  # every query: exactly rerank_top passages rescored
    corpus = load_beir(dataset_dir, "test").corpus
    for docs in run.values():
        ordered = [d for d, _ in sorted(docs.items(), key=lambda item: -item[1])]
        head = ordered[:3]
        lengths = [len(corpus[d]["title"]) + len(corpus[d]["text"]) for d in head]
        assert lengths == sorted(lengths)  # the reranked head: shortest passage first
    assert result.config("rr").spec["rerank"] is True
