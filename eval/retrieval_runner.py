"""Retrieval evaluation: several retriever configurations over one BEIR dataset.

Each configuration runs through the real retriever (``retrieval.HybridRetriever``)
on a cached throw-away index (:mod:`eval.index`); configurations that share the
chunking parameters and embedding model share one index. Chunk hits map back to
corpus documents by their best chunk (the first one in the retriever's order),
so ``fetch_k`` chunks are requested to fill the top ``k`` documents.

Example:
    >>> dataset = load_beir(Path("../shared/data/scifact-train"), split="train")
    >>> configs = [parse_config("bm25=bm25"), parse_config("hyb=hybrid,bm25_weight=0.6")]
    >>> result = RetrievalEvalRunner(dataset, configs, cache_dir=Path("/tmp/evalcache")).run()
    >>> result.metrics["hyb"]["ndcg@10"]
    0.71...
    >>> write_report(result, Path("runs/scifact"))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.configs import IndexParams, RetrieverConfig, check_unique
from eval.dataset import BeirDataset, Run, load_beir
from eval.errors import EvalError
from eval.index import CORPUS_ID_FIELD, EvalIndex, ensure_index
from eval.metrics import evaluate_run, latency_summary, ranked
from eval.results import ConfigResult, RunResult

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; stages are ``index:<key>`` and ``config:<name>``."""

_TIE_EPSILON = 1e-9
TOP_DOCS_IN_PER_QUERY = 10


def chunks_to_documents(hits: Sequence[tuple[str, float]], k: int) -> dict[str, float]:
    """Collapse ranked ``(corpus_id, chunk score)`` hits into the top ``k`` documents.

    A document takes the score of its best (first) chunk. Scores are made strictly
    decreasing by a tiny per-rank epsilon, so pytrec_eval (which breaks ties by
    document id) ranks the documents exactly in the retriever's order.
    """
    docs: dict[str, float] = {}
    for corpus_id, score in hits:
        if corpus_id in docs:
            continue
        docs[corpus_id] = float(score) - len(docs) * _TIE_EPSILON
        if len(docs) == k:
            break
    return docs


class RetrievalEvalRunner:
    """Runs retriever configurations over a BEIR dataset and scores them.

    Callable as a library (a background job passes ``progress``) and from
    ``ragloom eval retrieval``.

    Example:
        >>> runner = RetrievalEvalRunner(Path("data/scifact"), [parse_config("bm25=bm25")],
        ...                              cache_dir=Path("/tmp/cache"), split="test")
        >>> result = runner.run(progress=lambda stage, done, total: None)
        >>> result.metrics["bm25"]["ndcg@10"]

    Args:
        dataset: A loaded dataset, or a BEIR folder to load with ``split``.
        configs: The configurations (unique names).
        cache_dir: Where evaluation indexes are cached.
        split: Qrels split, when ``dataset`` is a folder.
        baseline: Configuration the report's deltas refer to (default: the first).
        max_queries: Evaluate only the first N judged queries (in id order), for quick runs.
        embedder_factory: ``model name -> Embedder``; default ``SentenceTransformerEmbedder``.
        reranker_factory: ``model name or path -> Reranker``; default ``CrossEncoderReranker``.
    """

    def __init__(
        self,
        dataset: BeirDataset | Path,
        configs: Sequence[RetrieverConfig],
        cache_dir: Path,
        *,
        split: str = "test",
        baseline: str | None = None,
        max_queries: int | None = None,
        embedder_factory: Callable[[str], Any] | None = None,
        reranker_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.configs = check_unique(list(configs))
        names = [c.name for c in self.configs]
        if baseline is not None and baseline not in names:
            raise EvalError(f"baseline {baseline!r} is not a configuration: {', '.join(names)}")
        if max_queries is not None and max_queries < 1:
            raise EvalError(f"max_queries must be >= 1, got {max_queries}")
        self.dataset = dataset if isinstance(dataset, BeirDataset) else load_beir(dataset, split)
        self.cache_dir = Path(cache_dir).expanduser()
        self.baseline = baseline or names[0]
        self.max_queries = max_queries
        self._embedder_factory = embedder_factory
        self._reranker_factory = reranker_factory
        self._embedders: dict[str, Any] = {}
        self._rerankers: dict[str, Any] = {}

    # -- resources ---------------------------------------------------------------

    def _embedder(self, model: str) -> Any:
        if model not in self._embedders:
            if self._embedder_factory is not None:
                self._embedders[model] = self._embedder_factory(model)
            else:
                from retrieval import SentenceTransformerEmbedder

                self._embedders[model] = SentenceTransformerEmbedder(model)
        return self._embedders[model]

    def _reranker(self, model: str) -> Any:
        if model not in self._rerankers:
            if self._reranker_factory is not None:
                reranker = self._reranker_factory(model)
            else:
                from retrieval import CrossEncoderReranker, resolve_model_path

                reranker = CrossEncoderReranker(resolve_model_path(model))
            self._rerankers[model] = reranker
        return self._rerankers[model]

    def _warm_up(self) -> None:
        """Load every model before any index is built, so a missing one fails fast."""
        from retrieval import RetrievalError

        try:
            for config in self.configs:
                # every index is built with embeddings, whatever the mode queried
                self._embedder(config.embedding_model).warm_up()
                if config.rerank:
                    self._reranker(config.reranker_model).warm_up()
        except RetrievalError as exc:
            raise EvalError(str(exc)) from exc

    # -- the run -----------------------------------------------------------------

    def run(self, progress: ProgressCallback | None = None) -> RunResult:
        """Build or reuse the indexes, run every configuration, score them.

        Args:
            progress: Optional ``progress(stage, done, total)`` callback.

        Returns:
            The run: metrics, per-query scores, TREC runs and recall curves.

        Raises:
            EvalError: a model cannot be loaded, indexing failed, or a search failed.
        """
        started = time.perf_counter()
        self._warm_up()
        queries = dict(sorted(self.dataset.queries.items()))
        if self.max_queries is not None:
            queries = dict(list(queries.items())[: self.max_queries])
        qrels = {qid: self.dataset.qrels[qid] for qid in queries}

        indexes: dict[IndexParams, EvalIndex] = {}
        results: list[ConfigResult] = []
        for config in self.configs:
            params = config.index_params
            if params not in indexes:
                stage = f"index:{len(indexes) + 1}"

                def report(done: int, total: int, stage: str = stage) -> None:
                    if progress is not None:
                        progress(stage, done, total)

                indexes[params] = ensure_index(
                    self.dataset,
                    params,
                    self.cache_dir,
                    self._embedder(params.embedding_model),
                    progress=report,
                )
            results.append(self._run_config(config, indexes[params], queries, qrels, progress))

        wall = time.perf_counter() - started
        info: dict[str, Any] = {
            "dataset": str(self.dataset.root),
            "split": self.dataset.split,
            "documents": len(self.dataset.corpus),
            "queries": len(queries),
            "judgements": sum(len(d) for d in qrels.values()),
            "indexes": len(indexes),
            "index_cache": "warm"
            if all(i.cached for i in indexes.values())
            else "cold"
            if not any(i.cached for i in indexes.values())
            else "mixed",
            "index_build_s": round(sum(i.build_seconds for i in indexes.values()), 2),
        }
        info["index_details"] = [
            {
                "key": i.key,
                "path": str(i.data_dir),
                "chunks": i.chunks,
                "cached": i.cached,
                "build_seconds": round(i.build_seconds, 2),
                "chunk_size": i.params.chunk_size,
                "chunk_overlap": i.params.chunk_overlap,
                "embedding_model": i.params.embedding_model,
            }
            for i in indexes.values()
        ]
        logger.info("retrieval evaluation finished in %.1fs", wall)
        return RunResult(
            kind="retrieval",
            configs=results,
            info=info,
            wall_time_s=wall,
            baseline=self.baseline,
            distribution_metric="ndcg@10",
        )

    def _retriever(self, config: RetrieverConfig, index: EvalIndex) -> Any:
        from retrieval import HybridRetriever

        return HybridRetriever.from_data_dir(
            index.data_dir,
            index.collection,
            embedder=self._embedder(config.embedding_model),
            k=config.fetch_k,
            mode=config.mode,
            fetch_k=config.fetch_k,
            dense_weight=config.dense_weight,
            bm25_weight=config.bm25_weight,
        )

    def _search(
        self, retriever: Any, config: RetrieverConfig, query: str
    ) -> list[tuple[str, float]]:
        """Ranked ``(corpus_id, score)`` chunk hits, reranked when the config says so."""
        chunks = retriever.search(query, k=config.fetch_k, mode=config.mode)
        hits: list[tuple[str, float, str]] = []
        for chunk in chunks:
            corpus_id = chunk.metadata.get(CORPUS_ID_FIELD)
            if corpus_id is None:
                raise EvalError(
                    f"chunk {chunk.chunk_id!r} has no {CORPUS_ID_FIELD!r} metadata: the "
                    "evaluation index is not one built by eval; delete it from the cache"
                )
            hits.append((str(corpus_id), float(chunk.score), chunk.text))
        if config.rerank and hits:
            head, tail = hits[: config.rerank_top], hits[config.rerank_top :]
            scores = self._reranker(config.reranker_model).score(query, [h[2] for h in head])
            head_ranked = sorted(
                ((h[0], float(s)) for h, s in zip(head, scores, strict=True)),
                key=lambda item: -item[1],
            )
            # Chunks past rerank_top stay below every reranked one, in retriever order.
            floor = min(s for _, s in head_ranked) - 1.0
            return head_ranked + [(h[0], floor - i) for i, h in enumerate(tail)]
        return [(h[0], h[1]) for h in hits]

    def _run_config(
        self,
        config: RetrieverConfig,
        index: EvalIndex,
        queries: dict[str, str],
        qrels: dict[str, dict[str, int]],
        progress: ProgressCallback | None,
    ) -> ConfigResult:
        from retrieval import RetrievalError

        stage = f"config:{config.name}"
        try:
            retriever = self._retriever(config, index)
            retriever.warm_up()
            self._search(retriever, config, next(iter(queries.values())))  # untimed warm-up
        except RetrievalError as exc:
            raise EvalError(f"{config.name}: {exc}") from exc
        run: Run = {}
        latencies: dict[str, float] = {}
        total = len(queries)
        for done, (qid, text) in enumerate(queries.items(), start=1):
            began = time.perf_counter()
            try:
                hits = self._search(retriever, config, text)
            except RetrievalError as exc:
                raise EvalError(f"{config.name}: query {qid!r} failed: {exc}") from exc
            latencies[qid] = (time.perf_counter() - began) * 1000.0
            run[qid] = chunks_to_documents(hits, config.k)
            if progress is not None:
                progress(stage, done, total)
        scores = evaluate_run(qrels, run)
        per_query = []
        for qid, metrics in scores.per_query.items():
            top = [doc_id for doc_id, _ in ranked(run.get(qid, {}))[:TOP_DOCS_IN_PER_QUERY]]
            per_query.append(
                {
                    "qid": qid,
                    **metrics,
                    "latency_ms": round(latencies.get(qid, 0.0), 3),
                    "retrieved": len(run.get(qid, {})),
                    "top": top,
                    "relevant": sorted(d for d, g in qrels[qid].items() if g > 0),
                }
            )
        metrics = {**scores.means, **latency_summary(list(latencies.values()))}
        logger.info(
            "%s: ndcg@10 %.4f, recall@100 %.4f over %d queries",
            config.name,
            metrics["ndcg@10"],
            metrics["recall@100"],
            total,
        )
        return ConfigResult(
            name=config.name,
            spec=config.spec(),
            metrics=metrics,
            per_query=per_query,
            run=run,
            recall_curve=scores.recall_curve,
        )
