"""HybridRetriever over a real ingested collection: modes, fusion, filters, LangChain, rerank."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from retrieval.hybrid import HybridRetriever, rrf_fuse
from retrieval.models import ModelNotAvailable, resolve_model_path
from retrieval.rerank import CrossEncoderReranker
from retrieval.stores import CollectionNotFound
from retrieval.types import SourceDocument, TextBlock
from tests.retrieval.helpers import TOPICS, make_ingestor, make_retriever, write_corpus

pytestmark = pytest.mark.integration

MANUAL_PAGES = {
    1: "Installing the widget: unpack the archive and run the installer as administrator.",
    2: "Configuring the widget: edit the settings file to change the colour theme.",
    3: "Troubleshooting the widget: if the installer fails, delete the cache folder.",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("hybrid")
    write_corpus(root / "src")
    ingestor = make_ingestor(root / "data")
    assert ingestor.ingest([root / "src"], "notes").ok
    manual = SourceDocument(
        source="/virtual/widget-manual.pdf",
        title="Widget manual",
        blocks=[TextBlock(text, page=page) for page, text in MANUAL_PAGES.items()],
    )
    # one document per page, so each page is its own chunk with page metadata
    pages = [
        SourceDocument(f"{manual.source}#page={b.page}", manual.title, [b], {"kind": "manual"})
        for b in manual.blocks
    ]
    assert ingestor.ingest_documents(pages, "notes").count("added") == 3
    ingestor.close()
    yield root / "data"


@pytest.fixture(scope="module", params=[True, False], ids=["exact", "chroma"])
def retriever(data_dir: Path, request: pytest.FixtureRequest) -> HybridRetriever:
    # the dense side from the index's exact vector copy, or from Chroma's HNSW
    return make_retriever(data_dir, "notes", k=3, exact_search=request.param)


def _source_name(doc: Document) -> str:
    return Path(doc.metadata["source"]).name


def test_rrf_fuse_formula_and_weights() -> None:
    dense = [("a", 0.9), ("b", 0.8)]
    lexical = [("b", 5.0), ("c", 4.0)]
    fused = dict(rrf_fuse(dense, lexical, rrf_k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["a"] == pytest.approx(1 / 61) and fused["c"] == pytest.approx(1 / 62)
    assert rrf_fuse(dense, lexical)[0][0] == "b"
    only_bm25 = rrf_fuse(dense, lexical, dense_weight=0.0)
    assert only_bm25[0][0] == "b" and dict(only_bm25)["a"] == 0.0
    assert rrf_fuse(dense, lexical, bm25_weight=3.0)[1][0] == "c"


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_mode_finds_the_right_note(retriever: HybridRetriever, mode: str) -> None:
    docs = retriever.invoke("Why do ocean tides rise and fall with the moon?", mode=mode)
    assert _source_name(docs[0]) == "tides.txt"
    meta = docs[0].metadata
    assert meta["rank"] == 1 and meta["doc_id"] and meta["chunk_id"].startswith(meta["doc_id"])
    assert meta["title"] == "tides.txt"
    if mode != "dense":
        assert meta["bm25_score"] > 0
    if mode != "bm25":
        assert 0 < meta["dense_score"] <= 1.0


def test_dense_finds_paraphrases_bm25_cannot(retriever: HybridRetriever) -> None:
    query = "insects signalling where nectar is"  # no word shared with the bees note
    dense = retriever.invoke(query, mode="dense")
    assert _source_name(dense[0]) == "bees.txt"
    assert all(_source_name(d) != "bees.txt" for d in retriever.invoke(query, mode="bm25"))
    assert _source_name(retriever.invoke(query, mode="hybrid")[0]) == "bees.txt"


def test_hybrid_scores_are_the_fused_ranks(retriever: HybridRetriever) -> None:
    query = "knight jumps over pieces"
    dense = [(c.chunk_id, 0.0) for c in retriever.search(query, k=50, mode="dense")]
    lexical = [(c.chunk_id, 0.0) for c in retriever.search(query, k=50, mode="bm25")]
    expected = rrf_fuse(dense, lexical, rrf_k=retriever.rrf_k)[:3]
    got = retriever.search(query, k=3, mode="hybrid")
    assert [c.chunk_id for c in got] == [i for i, _ in expected]
    assert [c.score for c in got] == pytest.approx([s for _, s in expected])
    assert [c.rank for c in got] == [1, 2, 3]
    assert got[0].dense_score is not None and got[0].bm25_score is not None


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_filters_apply_on_both_sides(retriever: HybridRetriever, mode: str) -> None:
    # page 3 is not the best match for "install"; the filter must still find it
    docs = retriever.invoke("installing the widget installer", mode=mode, filters={"page": 3})
    assert docs and all(d.metadata["page"] == 3 for d in docs)
    source = "/virtual/widget-manual.pdf#page=2"
    by_source = retriever.invoke("widget", mode=mode, filters={"source": source})
    assert [d.metadata["source"] for d in by_source] == [source]
    both = retriever.invoke("widget", mode=mode, filters={"kind": "manual", "page": 1})
    assert [d.metadata["page"] for d in both] == [1]
    assert retriever.invoke("widget", mode=mode, filters={"page": 99}) == []


def test_bm25_filter_is_applied_before_ranking(data_dir: Path) -> None:
    narrow = make_retriever(data_dir, "notes", k=1, fetch_k=1)
    docs = narrow.invoke("widget installer", mode="bm25", filters={"page": 2})
    assert [d.metadata["page"] for d in docs] == [2]  # not lost behind fetch_k=1


def test_langchain_invoke_ainvoke_batch(retriever: HybridRetriever) -> None:
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke("sourdough starter fermentation")
    assert len(docs) == 3 and _source_name(docs[0]) == "baking.txt"
    assert all(isinstance(d, Document) for d in docs)


async def test_langchain_ainvoke_and_batch(retriever: HybridRetriever) -> None:
    docs = await retriever.ainvoke("comet tail near the sun", k=1)
    assert len(docs) == 1 and _source_name(docs[0]) == "comet.txt"
    batched = retriever.batch(["lava and magma", "waggle dance"])
    assert [_source_name(b[0]) for b in batched] == ["volcano.txt", "bees.txt"]


def test_bad_arguments_and_unknown_collection(retriever: HybridRetriever, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="k must be > 0, got 0"):
        retriever.search("x", k=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        retriever.search("x", mode="fuzzy")
    with pytest.raises(ValueError, match="unknown retriever arguments: top"):
        retriever.invoke("x", top=3)
    with pytest.raises(ValueError, match="must be > 0"):
        make_retriever(data_dir, "notes", fetch_k=0)
    with pytest.raises(CollectionNotFound, match="'missing' does not exist"):
        make_retriever(data_dir, "missing")
    assert retriever.search("   ") == []


def test_all_topics_are_reachable(retriever: HybridRetriever) -> None:
    for name, text in TOPICS.items():
        assert _source_name(retriever.invoke(text, k=1)[0]) == f"{name}.txt"


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer BERT cross-encoder with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_reranks_by_its_own_scores(data_dir: Path, tiny_cross_encoder: Path) -> None:
    reranker = CrossEncoderReranker(str(tiny_cross_encoder))
    plain = make_retriever(data_dir, "notes", k=6)
    reranked = make_retriever(data_dir, "notes", k=6, reranker=reranker, rerank_top_n=6)
    query = "widget installer troubleshooting"
    before = plain.search(query)
    after = reranked.search(query)
    assert {c.chunk_id for c in after} == {c.chunk_id for c in before}
    direct = dict(
        zip(
            [c.chunk_id for c in before],
            reranker.score(query, [c.text for c in before]),
            strict=True,
        )
    )
    expected_order = sorted(direct, key=lambda i: -direct[i])
    assert [c.chunk_id for c in after] == expected_order
    assert [c.score for c in after] == pytest.approx([direct[i] for i in expected_order])
    assert all(c.metadata["fused_score"] > 0 for c in after)
    assert [c.chunk_id for c in after] != [c.chunk_id for c in before]  # it did reorder
    docs = reranked.invoke(query, k=2)
    assert len(docs) == 2 and docs[0].metadata["rerank_score"] >= docs[1].metadata["rerank_score"]


def test_cross_encoder_needs_a_local_folder() -> None:
    with pytest.raises(ModelNotAvailable, match="not a local folder"):
        CrossEncoderReranker("cross-encoder/ms-marco-MiniLM-L-6-v2").warm_up()
