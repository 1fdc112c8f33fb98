"""ChromaStore and BM25Index on disk: collections, names, add/skip/delete, filters, atomic swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.bm25_store import BM25Index, bm25_tokenize
from retrieval.stores import (
    ChromaStore,
    CollectionNotFound,
    InvalidCollectionName,
    StoreError,
    validate_collection_name,
    where_clause,
)


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["ab", "-abc", "abc-", "a b c", "a..b", "x" * 64, "über", ""])
def test_bad_collection_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidCollectionName, match="3-63 characters"):
        validate_collection_name(name)


@pytest.mark.parametrize("name", ["abc", "docs_v2", "my.docs-1", "A1" * 31 + "z"])
def test_good_collection_names_pass(name: str) -> None:
    assert validate_collection_name(name) == name


def test_where_clause_shapes() -> None:
    assert where_clause(None) is None
    assert where_clause({"page": 3}) == {"page": {"$eq": 3}}
    assert where_clause({"source": "a", "page": 3}) == {
        "$and": [{"page": {"$eq": 3}}, {"source": {"$eq": "a"}}]
    }


def test_chroma_collections_add_skip_query_filter_delete(tmp_path: Path) -> None:
    store = ChromaStore(tmp_path)
    assert store.list_collections() == []
    store.create_collection("alpha")
    store.create_collection("beta")
    assert store.list_collections() == ["alpha", "beta"]
    vecs = _unit(6)
    ids = [f"d{i}:0" for i in range(6)]
    metas = [{"source": f"s{i % 2}", "page": i, "missing": None} for i in range(6)]
    assert store.add("alpha", ids, vecs, [f"text {i}" for i in range(6)], metas) == 6
    # re-adding existing ids is a no-op (never re-upserted); new ids still go in
    more = np.vstack([vecs[:2], _unit(1, seed=9)])
    assert store.add("alpha", [*ids[:2], "d9:0"], more, ["x", "y", "z"], [{}, {}, {}]) == 1
    assert store.count("alpha") == 7
    assert store.get("alpha", ["d0:0"])["d0:0"][0] == "text 0"  # not overwritten by "x"
    hits = store.query("alpha", vecs[3], k=3, include_payload=True)
    assert hits[0].chunk_id == "d3:0" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].metadata == {"source": "s1", "page": 3}  # None values dropped
    filtered = store.query("alpha", vecs[3], k=10, filters={"source": "s0"})
    assert {h.chunk_id for h in filtered} == {"d0:0", "d2:0", "d4:0"}
    both = store.query("alpha", vecs[3], k=10, filters={"source": "s0", "page": 4})
    assert [h.chunk_id for h in both] == ["d4:0"]
    store.delete("alpha", ["d0:0", "nope"])
    assert store.all_ids("alpha") == {*ids[1:], "d9:0"}
    assert store.existing_ids("alpha", ["d1:0", "d0:0"]) == {"d1:0"}
    store.delete_collection("beta")
    assert store.list_collections() == ["alpha"]
    with pytest.raises(CollectionNotFound, match="'beta' does not exist"):
        store.count("beta")
    with pytest.raises(CollectionNotFound):
        store.delete_collection("beta")


def test_chroma_persists_across_clients(tmp_path: Path) -> None:
    first = ChromaStore(tmp_path)
    first.create_collection("keep", metadata={"embedding_model": "m"})
    first.add("keep", ["a:0"], _unit(1), ["hello"], [{"source": "a"}])
    second = ChromaStore(tmp_path)
    assert second.count("keep") == 1
    assert second.collection_metadata("keep")["embedding_model"] == "m"


def test_chroma_rejects_bad_url() -> None:
    with pytest.raises(ValueError, match="http"):
        ChromaStore(url="ftp://example")


def test_bm25_tokenizer_stems_and_drops_stopwords() -> None:
    assert bm25_tokenize("The runners and the running dogs") == ["runner", "run", "dog"]
    assert bm25_tokenize("the a of") == []


def test_bm25_build_search_filters_and_swap(tmp_path: Path) -> None:
    index = BM25Index(tmp_path / "bm25")
    index.create_collection("notes")
    assert index.list_collections() == ["notes"]
    assert index.search("notes", "anything", k=5) == []  # empty index
    ids = ["a:0", "b:0", "c:0"]
    texts = ["cats chase mice", "dogs chase cats in the park", "stock markets fell sharply"]
    metas = [{"source": "a", "page": 1}, {"source": "b", "page": 2}, {"source": "c", "page": 1}]
    index.build("notes", ids, texts, metas)
    hits = index.search("notes", "chasing cat", k=5)
    assert [h.chunk_id for h in hits][:2] and {h.chunk_id for h in hits} == {"a:0", "b:0"}
    assert all(h.score > 0 for h in hits)
    assert index.search("notes", "chasing cat", k=1)[0].chunk_id == hits[0].chunk_id
    assert [h.chunk_id for h in index.search("notes", "cats", k=5, filters={"source": "b"})] == [
        "b:0"
    ]
    assert index.search("notes", "cats", k=5, filters={"page": 1}) == [
        index.search("notes", "cats", k=5, filters={"source": "a"})[0]
    ]
    assert index.search("notes", "unrelated zebra", k=5) == []
    assert index.lookup("notes", ["c:0", "zz"]) == {"c:0": (texts[2], metas[2])}
    # a rebuild replaces the content; a reader holding the old version reloads
    reader = BM25Index(tmp_path / "bm25")
    assert reader.count("notes") == 3
    index.build("notes", ["d:0"], ["zebras graze"], [{"source": "d"}])
    assert reader.count("notes") == 1
    assert reader.search("notes", "zebra", k=3)[0].chunk_id == "d:0"
    folder = tmp_path / "bm25" / "notes"
    assert len([p for p in folder.iterdir() if p.name.startswith("v-")]) == 1  # old one removed
    index.delete_collection("notes")
    assert index.list_collections() == []
    with pytest.raises(CollectionNotFound):
        index.search("notes", "zebra", k=3)


def test_bm25_rejects_bad_k(tmp_path: Path) -> None:
    index = BM25Index(tmp_path)
    index.build("notes", ["a:0"], ["x y z words"], [{}])
    with pytest.raises(ValueError, match="k must be > 0, got 0"):
        index.search("notes", "words", k=0)


def test_bm25_index_keeps_vectors_for_exact_dense_search(tmp_path: Path) -> None:
    index = BM25Index(tmp_path / "bm25")
    ids = [f"d{i}:0" for i in range(40)]
    texts = [f"note number {i}" for i in range(40)]
    metas = [{"source": f"s{i % 4}", "page": i} for i in range(40)]
    vectors = 3.0 * _unit(40, d=16, seed=5)  # not unit length: the index normalizes
    index.build("notes", ids, texts, metas, vectors=vectors)
    assert index.has_vectors("notes")
    reader = BM25Index(tmp_path / "bm25")  # another process's view, from disk
    reader.warm_up("notes")  # builds the scan before the first query
    assert reader._load("notes")._scan is not None
    query = vectors[7] + 0.05
    hits = reader.dense_search("notes", query, k=5)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ (query / np.linalg.norm(query))
    assert [h.chunk_id for h in hits] == [ids[i] for i in np.argsort(-cosine)[:5]]
    assert hits[0].chunk_id == "d7:0" and hits[0].text == "note number 7"
    assert hits[0].metadata == metas[7]
    assert [h.score for h in hits] == pytest.approx(sorted(cosine, reverse=True)[:5], abs=1e-5)
    filtered = reader.dense_search("notes", query, k=50, filters={"source": "s2"})
    assert len(filtered) == 10 and {h.metadata["source"] for h in filtered} == {"s2"}
    assert [h.score for h in filtered] == sorted((h.score for h in filtered), reverse=True)
    assert reader.dense_search("notes", query, k=5, filters={"source": "none"}) == []
    with pytest.raises(StoreError, match="dimension 8, collection 'notes' holds 16"):
        reader.dense_search("notes", np.ones(8, dtype=np.float32), k=3)
    with pytest.raises(ValueError, match="one vector per chunk"):
        index.build("notes", ids, texts, metas, vectors=vectors[:3])
    # a rebuild without vectors: readers notice and must use Chroma instead
    index.build("notes", ids[:2], texts[:2], metas[:2])
    assert not reader.has_vectors("notes")
    with pytest.raises(StoreError, match="holds no vectors"):
        reader.dense_search("notes", query, k=3)
    index.build("notes", [], [], [])
    assert reader.has_vectors("notes") and reader.dense_search("notes", query, k=3) == []
    assert not reader.has_vectors("missing")


def test_chroma_embeddings_come_back_in_the_asked_order(tmp_path: Path) -> None:
    store = ChromaStore(tmp_path)
    store.create_collection("docs")
    vectors = _unit(5)
    ids = [f"x{i}:0" for i in range(5)]
    store.add("docs", ids, vectors, [f"t{i}" for i in range(5)], [{} for _ in range(5)])
    got = store.embeddings("docs", ids[::-1])
    np.testing.assert_allclose(got, vectors[::-1], atol=1e-6)
    with pytest.raises(StoreError, match="1 chunks of 'docs' have no stored vector"):
        store.embeddings("docs", [ids[0], "nope:0"])
