"""Ingestion on real files, real Chroma, real BM25 files and the real MiniLM model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.ingest import Ingestor, WriterLock, WriterLocked, doc_id_for
from retrieval.stores import ChromaStore, InvalidCollectionName
from retrieval.types import RetrievalError
from tests.retrieval.helpers import SAMPLES, TOPICS, make_ingestor, make_retriever, write_corpus

pytestmark = pytest.mark.integration


def assert_in_sync(ingestor: Ingestor, collection: str) -> set[str]:
    """Chroma ids == BM25 ids == the manifest's committed chunk ids; nothing pending."""
    committed = ingestor.manifest.committed_chunk_ids(collection)
    assert ingestor.chroma.all_ids(collection) == committed
    bm25_ids = ingestor.bm25.all_ids(collection)
    assert len(bm25_ids) == len(set(bm25_ids)) and set(bm25_ids) == committed
    assert ingestor.manifest.pending(collection) == {}
    assert ingestor.manifest.garbage(collection) == []
    # the exact-search copy of the vectors is Chroma's, row for row
    vectors = ingestor.bm25.vectors(collection)
    if 0 < len(bm25_ids) <= ingestor.exact_search_max_chunks:
        assert vectors is not None
        stored = ingestor.chroma.embeddings(collection, bm25_ids)
        stored /= np.linalg.norm(stored, axis=1, keepdims=True)
        np.testing.assert_allclose(vectors, stored, atol=1e-6)
    docs = ingestor.manifest.documents(collection)
    assert sum(d.n_chunks for d in docs.values()) == len(committed)
    return committed


def statuses(report: Any) -> dict[str, str]:
    return {Path(f.path).name: f.status for f in report.files}


def test_ingest_skip_replace_prune_keeps_stores_in_sync(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "src")
    ingestor = make_ingestor(tmp_path / "data")
    first = ingestor.ingest([tmp_path / "src"], "notes")
    assert first.ok and first.count("added") == len(TOPICS)
    assert all(f.chunks >= 1 for f in first.files)
    ids = assert_in_sync(ingestor, "notes")
    assert len(ingestor.manifest.documents("notes")) == len(TOPICS)

    again = ingestor.ingest([tmp_path / "src"], "notes")  # idempotent
    assert again.count("unchanged") == len(TOPICS) and again.chunks_added == 0
    assert assert_in_sync(ingestor, "notes") == ids

    tides_id = doc_id_for(str(paths["tides"].resolve()))
    old_tides = {i for i in ids if i.startswith(tides_id)}
    paths["tides"].write_text("Spring tides happen at new moon and full moon.\n", encoding="utf-8")
    changed = ingestor.ingest([tmp_path / "src"], "notes")
    assert statuses(changed)["tides.txt"] == "updated"
    assert changed.count("unchanged") == len(TOPICS) - 1
    ids2 = assert_in_sync(ingestor, "notes")
    assert not (old_tides & ids2)  # the old version's chunks are gone from both stores
    retriever = make_retriever(tmp_path / "data", "notes", k=1)
    for mode in ("bm25", "dense"):
        top = retriever.search("spring tides at full moon", mode=mode)[0]
        assert top.metadata["source"] == str(paths["tides"].resolve())
        assert "Spring tides" in top.text

    paths["comet"].unlink()
    kept = ingestor.ingest([tmp_path / "src"], "notes")  # no prune: comet stays
    assert "comet.txt" not in statuses(kept)
    assert len(ingestor.manifest.documents("notes")) == len(TOPICS)
    pruned = ingestor.ingest([tmp_path / "src"], "notes", prune=True)
    assert statuses(pruned)["comet.txt"] == "pruned"
    assert len(ingestor.manifest.documents("notes")) == len(TOPICS) - 1
    remaining = assert_in_sync(ingestor, "notes")
    comet_id = doc_id_for(str(paths["comet"].resolve()))
    assert not any(i.startswith(comet_id) for i in remaining)


def test_vector_copy_follows_the_limit_and_old_indexes_get_it(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "src")
    data = tmp_path / "data"
    without = make_ingestor(data, exact_search_max_chunks=0)
    assert without.ingest([tmp_path / "src"], "notes").ok
    assert without.bm25.vectors("notes") is None and not without.bm25.has_vectors("notes")
    hnsw = make_retriever(data, "notes", k=3)  # no copy: the dense side asks Chroma
    top = hnsw.search("the moon pulls the sea", mode="dense")[0]
    assert top.metadata["source"] == str(paths["tides"].resolve())
    without.close()

    again = make_ingestor(data)  # nothing changed, but the index lacks its copy
    report = again.ingest([tmp_path / "src"], "notes")
    assert report.count("unchanged") == len(TOPICS) and report.chunks_added == 0
    assert again.bm25.has_vectors("notes")
    assert_in_sync(again, "notes")
    exact = make_retriever(data, "notes", k=3)
    chroma = make_retriever(data, "notes", k=3, exact_search=False)
    for query in ("the moon pulls the sea", "bread dough rising", "lava from a mountain"):
        got = exact.search(query, mode="dense")
        want = chroma.search(query, mode="dense")
        assert [c.chunk_id for c in got] == [c.chunk_id for c in want]
        assert [c.dense_score for c in got] == pytest.approx(
            [c.dense_score for c in want], abs=1e-5
        )
        assert got[0].text == want[0].text and got[0].metadata == want[0].metadata
    with pytest.raises(ValueError, match="exact_search_max_chunks must be >= 0"):
        make_ingestor(data, exact_search_max_chunks=-1)
    again.close()


def test_bad_files_are_reported_and_never_stop_the_batch(tmp_path: Path) -> None:
    write_corpus(tmp_path / "src", {"good": "A perfectly readable note about gardens."})
    (tmp_path / "src" / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "src" / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    weird = tmp_path / "notes.xyz"
    weird.write_text("unsupported", encoding="utf-8")
    ingestor = make_ingestor(tmp_path / "data")
    report = ingestor.ingest([tmp_path / "src", weird], "mixed")
    got = statuses(report)
    assert got["good.txt"] == "added"
    assert got["empty.txt"] == got["broken.pdf"] == got["notes.xyz"] == "failed"
    reasons = {Path(f.path).name: f.reason or "" for f in report.failed}
    assert "empty" in reasons["empty.txt"]
    assert "unsupported" in reasons["notes.xyz"]
    assert not report.ok and "failed 3" in report.summary()
    assert_in_sync(ingestor, "mixed")


def test_table_rows_become_documents_and_removed_rows_are_pruned(tmp_path: Path) -> None:
    from retrieval.ingest import default_loader
    from retrieval.loaders import TableOptions

    table = tmp_path / "faq.csv"
    table.write_text(
        "qid,question,answer\n"
        "q1,How do I reset my password?,Use the reset link on the login page.\n"
        "q2,Can I change my plan?,Plans change from the billing settings.\n",
        encoding="utf-8",
    )
    loader = default_loader(
        table=TableOptions(text_columns=["question", "answer"], id_column="qid")
    )
    ingestor = make_ingestor(tmp_path / "data", loader=loader)
    report = ingestor.ingest([table], "faq")
    assert report.files[0].documents == 2 and report.files[0].status == "added"
    assert len(ingestor.manifest.documents("faq")) == 2
    table.write_text(
        "qid,question,answer\n"
        "q1,How do I reset my password?,Use the reset link on the login page.\n",
        encoding="utf-8",
    )
    ingestor.ingest([table], "faq", prune=True)
    assert len(ingestor.manifest.documents("faq")) == 1
    assert_in_sync(ingestor, "faq")


def test_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from retrieval.ingest import WriterLock\n"
            f"with WriterLock(Path({str(data)!r})):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        write_corpus(tmp_path / "src", {"one": "one note"})
        with pytest.raises(WriterLocked, match=rf"pid {holder.pid}\).*wait for it"):
            make_ingestor(data).ingest([tmp_path / "src"], "notes")
    finally:
        holder.kill()
        holder.wait()
    with WriterLock(data):  # released when the holder died
        pass


def test_collections_create_list_delete_and_names(tmp_path: Path) -> None:
    ingestor = make_ingestor(tmp_path / "data")
    ingestor.create_collection("alpha")
    ingestor.create_collection("alpha")  # idempotent
    assert [c.name for c in ingestor.manifest.collections()] == ["alpha"]
    assert ingestor.chroma.list_collections() == ["alpha"]
    assert ingestor.bm25.list_collections() == ["alpha"]
    with pytest.raises(InvalidCollectionName):
        ingestor.create_collection("no spaces please")
    with pytest.raises(InvalidCollectionName):
        ingestor.ingest([tmp_path], "x")
    ingestor.delete_collection("alpha")
    assert ingestor.chroma.list_collections() == ingestor.bm25.list_collections() == []
    assert ingestor.manifest.collections() == []
    with pytest.raises(RetrievalError, match="'alpha' does not exist"):
        ingestor.delete_collection("alpha")


class _CrashingChroma(ChromaStore):
    """Stores half of a batch, then dies: what a kill -9 during ``add`` leaves behind."""

    def add(self, name: str, ids: Any, embeddings: Any, texts: Any, metadatas: Any) -> int:
        half = len(ids) // 2 or 1
        super().add(name, ids[:half], embeddings[:half], texts[:half], metadatas[:half])
        raise KeyboardInterrupt("simulated crash mid-add")


def test_crash_during_chroma_add_is_rolled_back_then_completed(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "src")
    data = tmp_path / "data"
    ingestor = make_ingestor(data, batch_chunks=2)
    ingestor.ingest([paths["volcano"]], "notes")  # one committed document
    ingestor.chroma = _CrashingChroma(data)
    with pytest.raises(KeyboardInterrupt):
        ingestor.ingest([tmp_path / "src"], "notes")
    # left behind: pending rows and chunks in Chroma the manifest never committed
    assert ingestor.manifest.pending("notes")
    assert ingestor.chroma.count("notes") > len(ingestor.manifest.committed_chunk_ids("notes"))
    assert ingestor.manifest.collection("notes").dirty  # type: ignore[union-attr]

    fresh = make_ingestor(data)
    report = fresh.ingest([tmp_path / "src"], "notes")
    assert report.recovered_documents >= 1
    assert len(fresh.manifest.documents("notes")) == len(TOPICS)
    ids = assert_in_sync(fresh, "notes")
    per_doc = [i.split(":")[0] for i in ids]
    assert len(set(per_doc)) == len(TOPICS)
    assert not fresh.manifest.collection("notes").dirty  # type: ignore[union-attr]


def test_crash_after_commit_before_old_chunks_deleted(tmp_path: Path) -> None:
    paths = write_corpus(tmp_path / "src", {"alpha": "first version of alpha"})
    data = tmp_path / "data"
    ingestor = make_ingestor(data)
    ingestor.ingest([tmp_path / "src"], "notes")
    old = ingestor.manifest.committed_chunk_ids("notes")

    class _NoDelete(ChromaStore):
        def delete(self, name: str, ids: Any) -> None:
            raise KeyboardInterrupt("simulated crash before the old chunks are deleted")

    ingestor.chroma = _NoDelete(data)
    paths["alpha"].write_text("second version of alpha", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        ingestor.ingest([tmp_path / "src"], "notes")
    assert set(ingestor.manifest.garbage("notes")) == old
    fresh = make_ingestor(data)
    fresh.ingest([tmp_path / "src"], "notes")
    ids = assert_in_sync(fresh, "notes")
    assert not (ids & old)
    assert "second version" in fresh.bm25.search("notes", "second version", k=1)[0].text


def test_ingest_batches_across_documents(tmp_path: Path) -> None:
    write_corpus(tmp_path / "src")
    calls: list[int] = []
    ingestor = make_ingestor(tmp_path / "data", batch_chunks=1000)
    embed = ingestor.embedder.embed_documents

    def counting(texts: Any) -> np.ndarray:
        calls.append(len(texts))
        return embed(texts)

    ingestor.embedder.embed_documents = counting  # type: ignore[method-assign]
    try:
        ingestor.ingest([tmp_path / "src"], "notes")
    finally:
        del ingestor.embedder.embed_documents  # type: ignore[method-assign]
    assert len(calls) == 1 and calls[0] >= len(TOPICS)  # one embedding call for all documents


def test_embedding_model_mismatch_is_refused(tmp_path: Path) -> None:
    write_corpus(tmp_path / "src", {"one": "one note"})
    make_ingestor(tmp_path / "data").ingest([tmp_path / "src"], "notes")
    other = make_ingestor(tmp_path / "data")
    other.embedder.model_name = "another-model"  # type: ignore[misc]
    try:
        with pytest.raises(RetrievalError, match="built with embedding model 'all-MiniLM-L6-v2'"):
            other.ingest([tmp_path / "src"], "notes")
    finally:
        other.embedder.model_name = "all-MiniLM-L6-v2"  # type: ignore[misc]


@pytest.mark.slow
def test_docs_samples_html_rst_pdf_then_query_finds_the_right_file(tmp_path: Path) -> None:
    files = [
        SAMPLES / "html" / "json.html",
        SAMPLES / "html" / "classes.html",
        SAMPLES / "rst",
        SAMPLES / "pdf" / "R-data.pdf",
    ]
    ingestor = make_ingestor(tmp_path / "data")
    started = time.monotonic()
    report = ingestor.ingest(files, "samples")
    assert report.ok, [f.reason for f in report.failed]
    assert report.count("added") == 6, report.files
    print(f"docs-samples subset: {report.chunks_added} chunks in {time.monotonic() - started:.1f}s")
    assert_in_sync(ingestor, "samples")
    retriever = make_retriever(tmp_path / "data", "samples", k=3)
    expectations = {
        "How do I write rows to a CSV file with a writer object?": "csv.rst.txt",
        "How do I import data from a spreadsheet or a relational database into R?": "R-data.pdf",
        "What happens with multiple inheritance and the method resolution order?": "classes.html",
        "How do I catch an exception and handle it with try and except?": "errors.rst.txt",
    }
    for question, expected in expectations.items():
        top = retriever.invoke(question)[0]
        assert Path(top.metadata["source"]).name == expected, (question, top.metadata)
    pdf_hit = retriever.invoke("read.table function and its arguments", k=1)[0]
    assert pdf_hit.metadata["source"].endswith("R-data.pdf")
    assert isinstance(pdf_hit.metadata.get("page"), int)
    page = pdf_hit.metadata["page"]
    on_page = retriever.invoke("read.table", k=5, filters={"page": page})
    assert on_page and all(d.metadata["page"] == page for d in on_page)
