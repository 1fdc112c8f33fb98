"""Retrieval benchmark on BEIR SciFact (train): our pipeline vs LangChain's EnsembleRetriever.

Prints one table: nDCG@10 and Recall@100 (pytrec_eval) for bm25, dense and
hybrid (and, for latency at a RAG query's size, hybrid at k=10 from 50 candidates
per side), the same for LangChain's ``EnsembleRetriever`` over ``BM25Retriever``
(langchain-community, rank_bm25) + a dense retriever on the same Chroma
collection and the same model; query latency p50/p95 for both; ingestion
throughput of our pipeline against raw ``SentenceTransformer.encode`` on the
same chunks. Targets are printed beside each figure.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retrieval.py \\
        [--dataset ../shared/data/scifact-train] [--data-dir /tmp/x] [--limit-docs N]

Nothing is written to the repository: the index goes to a temporary folder
(or ``--data-dir``; a second run on the same folder skips the unchanged corpus,
so throughput is only measured on a fresh folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytrec_eval

from retrieval import HybridRetriever, Ingestor, SentenceTransformerEmbedder
from retrieval.bm25_store import bm25_tokenize
from retrieval.hybrid import DEFAULT_RRF_K
from retrieval.types import SourceDocument, TextBlock

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT.parent / "shared" / "data" / "scifact-train"
COLLECTION = "scifact"
K_EVAL = 100
RAG_K, RAG_FETCH_K = 10, 50  # an extra latency row at a RAG query's size

logger = logging.getLogger("benchmarks.retrieval")


def load_beir(folder: Path, limit_docs: int | None) -> tuple[list[dict[str, Any]], dict, dict]:
    with open(folder / "corpus.jsonl", encoding="utf-8") as fh:
        corpus = [json.loads(line) for line in fh]
    if limit_docs:
        corpus = corpus[:limit_docs]
    ids = {d["_id"] for d in corpus}
    queries = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / "train.tsv", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            if did in ids:
                qrels.setdefault(qid, {})[did] = int(score)
    queries = {q: t for q, t in queries.items() if q in qrels}
    return corpus, queries, qrels


def evaluate(run: dict[str, dict[str, float]], qrels: dict) -> tuple[float, float]:
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"})
    scores = evaluator.evaluate(run)
    ndcg = statistics.mean(s["ndcg_cut_10"] for s in scores.values())
    recall = statistics.mean(s["recall_100"] for s in scores.values())
    return ndcg, recall


def to_doc_run(ranked_beir_ids: list[str]) -> dict[str, float]:
    """Chunk hits (best first) -> BEIR doc scores by each doc's best chunk rank."""
    run: dict[str, float] = {}
    for rank, beir_id in enumerate(ranked_beir_ids, start=1):
        if beir_id not in run:
            run[beir_id] = 1.0 / rank
    return run


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def run_ours(
    retriever: HybridRetriever, queries: dict[str, str], mode: str, k: int = K_EVAL
) -> tuple[dict, list[float]]:
    run: dict[str, dict[str, float]] = {}
    latencies: list[float] = []
    for qid, text in queries.items():
        started = time.perf_counter()
        hits = retriever.search(text, k=k, mode=mode)
        latencies.append(time.perf_counter() - started)
        run[qid] = to_doc_run([str(h.metadata["beir_id"]) for h in hits])
    return run, latencies


def build_peer(ingestor: Ingestor, model: Any) -> Any:
    """LangChain EnsembleRetriever(BM25Retriever, dense on the same Chroma collection)."""
    from langchain_classic.retrievers import EnsembleRetriever
    from langchain_community.retrievers import BM25Retriever
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore

    class STEmbeddings(Embeddings):
        """The same SentenceTransformer, called the way LangChain wrappers call it."""

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return model.encode(texts, normalize_embeddings=True).tolist()

        def embed_query(self, text: str) -> list[float]:
            return model.encode(text, normalize_embeddings=True).tolist()

    class ChromaCollectionStore(VectorStore):
        """A minimal VectorStore over the chroma collection our pipeline filled."""

        def __init__(self, collection: Any, embedding: Embeddings) -> None:
            self.collection = collection
            self._embedding = embedding

        @property
        def embeddings(self) -> Embeddings:
            return self._embedding

        def add_texts(self, texts: Any, metadatas: Any = None, **kwargs: Any) -> list[str]:
            raise NotImplementedError("read-only benchmark store")

        @classmethod
        def from_texts(cls, texts: Any, embedding: Any, metadatas: Any = None, **kw: Any) -> Any:
            raise NotImplementedError("read-only benchmark store")

        def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
            vector = self._embedding.embed_query(query)
            res = self.collection.query(
                query_embeddings=[vector], n_results=k, include=["documents", "metadatas"]
            )
            return [
                Document(page_content=text, metadata=meta)
                for text, meta in zip(res["documents"][0], res["metadatas"][0], strict=True)
            ]

    _, texts, metas = ingestor.manifest.committed_chunks(COLLECTION)
    bm25 = BM25Retriever.from_texts(texts, metadatas=metas, preprocess_func=bm25_tokenize)
    bm25.k = K_EVAL
    dense_store = ChromaCollectionStore(ingestor.chroma.collection(COLLECTION), STEmbeddings())
    dense = dense_store.as_retriever(search_kwargs={"k": K_EVAL})
    return EnsembleRetriever(retrievers=[dense, bm25], weights=[0.5, 0.5], c=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--limit-docs", type=int, default=None)
    parser.add_argument("--limit-queries", type=int, default=None)
    parser.add_argument("--fetch-k", type=int, default=100)
    parser.add_argument("--dense-weight", type=float, default=1.0)
    parser.add_argument("--bm25-weight", type=float, default=1.0)
    parser.add_argument("--rrf-k", type=int, default=DEFAULT_RRF_K)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-raw", action="store_true", help="do not time raw encode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    corpus, queries, qrels = load_beir(args.dataset, args.limit_docs)
    if args.limit_queries:
        queries = dict(list(queries.items())[: args.limit_queries])
        qrels = {q: qrels[q] for q in queries}
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ragloom-bench-")
        data_dir = Path(tmp.name)
    else:
        data_dir = args.data_dir
    print(f"corpus {len(corpus)} docs, {len(queries)} queries, data dir {data_dir}", flush=True)
    from llm_backend.engine.quantize import cpu_description

    print(f"cpu: {cpu_description()}", flush=True)

    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2", batch_size=args.batch_size)
    embedder.warm_up()
    ingestor = Ingestor(data_dir, embedder=embedder, batch_chunks=1024)
    documents = [
        SourceDocument(
            source=f"scifact:{d['_id']}",
            title=d["title"],
            blocks=[TextBlock(f"{d['title']} {d['text']}")],
            metadata={"beir_id": d["_id"]},
        )
        for d in corpus
    ]
    report = ingestor.ingest_documents(documents, COLLECTION)
    n_chunks = len(ingestor.manifest.committed_chunk_ids(COLLECTION))
    fresh = report.chunks_added == n_chunks and n_chunks > 0
    ours_cps = report.chunks_added / report.seconds if fresh else float("nan")
    print(f"ingest: {report.summary()}", flush=True)

    raw_cps = float("nan")
    if fresh and not args.skip_raw:
        _, texts, _ = ingestor.manifest.committed_chunks(COLLECTION)
        started = time.perf_counter()
        embedder.model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        raw_cps = len(texts) / (time.perf_counter() - started)
        print(f"raw encode: {raw_cps:.1f} chunks/s", flush=True)

    retriever = HybridRetriever.from_data_dir(
        data_dir,
        COLLECTION,
        embedder=embedder,
        k=K_EVAL,
        fetch_k=args.fetch_k,
        dense_weight=args.dense_weight,
        bm25_weight=args.bm25_weight,
        rrf_k=args.rrf_k,
    )
    retriever.warm_up()
    retriever.search("warm up the caches", mode="hybrid")
    results: dict[str, tuple[float, float, list[float]]] = {}
    for mode in ("bm25", "dense", "hybrid"):
        run, lat = run_ours(retriever, queries, mode)
        ndcg, recall = evaluate(run, qrels)
        results[mode] = (ndcg, recall, lat)
        print(f"ours {mode}: nDCG@10 {ndcg:.4f} R@100 {recall:.4f}", flush=True)

    # What a RAG query asks for: 10 results from 50 candidates per side.
    retriever.fetch_k = RAG_FETCH_K
    rag_run, rag_lat = run_ours(retriever, queries, "hybrid", k=RAG_K)
    rag_ndcg, _ = evaluate(rag_run, qrels)
    retriever.fetch_k = args.fetch_k

    peer = build_peer(ingestor, embedder.model)
    peer.invoke("warm up")
    peer_run: dict[str, dict[str, float]] = {}
    peer_lat: list[float] = []
    for qid, text in queries.items():
        started = time.perf_counter()
        docs = peer.invoke(text)
        peer_lat.append(time.perf_counter() - started)
        peer_run[qid] = to_doc_run([str(d.metadata["beir_id"]) for d in docs])
    peer_ndcg, peer_recall = evaluate(peer_run, qrels)

    best_single = max(results["bm25"][0], results["dense"][0])
    hyb_ndcg = results["hybrid"][0]
    hyb_p50 = percentile(results["hybrid"][2], 50)
    peer_p50 = percentile(peer_lat, 50)
    ratio = ours_cps / raw_cps if raw_cps == raw_cps and ours_cps == ours_cps else float("nan")

    def ok(flag: bool) -> str:
        return "PASS" if flag else "MISS"

    print()
    print(
        f"SciFact train: {len(corpus)} docs -> {n_chunks} chunks, {len(queries)} queries, "
        f"k={K_EVAL}, fetch_k={args.fetch_k}, weights dense={args.dense_weight} "
        f"bm25={args.bm25_weight}, rrf_k={args.rrf_k}"
    )
    header = f"{'system':<34}{'nDCG@10':>9}{'R@100':>8}{'p50 ms':>9}{'p95 ms':>9}"
    print(header)
    print("-" * len(header))
    for mode in ("bm25", "dense", "hybrid"):
        ndcg, recall, lat = results[mode]
        print(
            f"{'ragloom ' + mode:<34}{ndcg:>9.4f}{recall:>8.4f}"
            f"{percentile(lat, 50):>9.2f}{percentile(lat, 95):>9.2f}"
        )
    print(
        f"{f'ragloom hybrid k={RAG_K} fetch_k={RAG_FETCH_K}':<34}{rag_ndcg:>9.4f}{'-':>8}"
        f"{percentile(rag_lat, 50):>9.2f}{percentile(rag_lat, 95):>9.2f}"
    )
    print(
        f"{'langchain Ensemble(BM25+Chroma)':<34}{peer_ndcg:>9.4f}{peer_recall:>8.4f}"
        f"{peer_p50:>9.2f}{percentile(peer_lat, 95):>9.2f}"
    )
    print()
    print("targets")
    target_ndcg = best_single + 0.02
    print(
        f"  hybrid nDCG@10 {hyb_ndcg:.4f} >= best single {best_single:.4f} + 0.02 "
        f"= {target_ndcg:.4f}: {ok(hyb_ndcg >= target_ndcg)}"
    )
    print(f"  hybrid p50 {hyb_p50:.2f} ms <= 10 ms: {ok(hyb_p50 <= 10.0)}")
    speedup = peer_p50 / hyb_p50
    print(f"  hybrid p50 {speedup:.1f}x faster than peer p50 {peer_p50:.2f} ms >= 3x: ", end="")
    print(ok(speedup >= 3.0))
    print(
        f"  ingestion {ours_cps:.1f} chunks/s vs raw encode {raw_cps:.1f} chunks/s = "
        f"{ratio:.2f}x >= 0.85x: {ok(ratio >= 0.85) if ratio == ratio else 'n/a (not fresh)'}"
    )
    ingestor.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
