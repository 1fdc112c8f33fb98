"""BEIR loading: good folders load, bad ones name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.dataset import load_beir, load_qrels
from eval.errors import DatasetError
from tests.eval.beir_fixtures import DOCS, write_beir


def test_loads_crlf_folder_with_graded_scores(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds", crlf=True)
    data = load_beir(root, split="test")
    assert len(data.corpus) == len(DOCS)
    assert data.corpus["d2"] == {"title": "Volcanoes", "text": DOCS["d2"][1]}
    assert data.qrels["q2"] == {"d2": 2}
    assert data.qrels["q4"] == {"d11": 1, "d1": 0}
    # only judged queries are kept; no stray carriage returns anywhere
    assert sorted(data.queries) == ["q1", "q2", "q3", "q4", "q5"]
    assert all("\r" not in t for t in data.queries.values())
    assert data.num_judgements == 6


def test_corpus_hash_follows_content(tmp_path: Path) -> None:
    a = load_beir(write_beir(tmp_path / "a"), "test")
    b = load_beir(write_beir(tmp_path / "b", crlf=True), "test")
    assert a.corpus_hash() == b.corpus_hash()  # line endings do not change content
    docs = dict(DOCS)
    docs["d3"] = ("Honey bees", "Bees make honey.")
    c = load_beir(write_beir(tmp_path / "c", docs=docs), "test")
    assert c.corpus_hash() != a.corpus_hash()


def test_missing_split_lists_available_ones(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds", split="dev")
    with pytest.raises(DatasetError, match=r"test\.tsv.*available splits: dev"):
        load_beir(root, split="test")


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl"])
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    root = write_beir(tmp_path / "ds")
    (root / name).unlink()
    with pytest.raises(DatasetError, match=rf"{name}: file not found"):
        load_beir(root, split="test")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_beir(tmp_path / "nope")


def test_qrels_document_absent_from_corpus_names_line(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds", qrels=[("q1", "d1", 1), ("q2", "ghost", 1)])
    with pytest.raises(DatasetError) as info:
        load_beir(root, split="test")
    # line 1 is the header, so the ghost pair is on line 3
    assert str(info.value).startswith(f"{root / 'qrels' / 'test.tsv'}:3:")
    assert "'ghost' is not in" in str(info.value)
    assert info.value.line == 3


def test_qrels_query_absent_from_queries(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds", qrels=[("q99", "d1", 1)])
    with pytest.raises(DatasetError, match=r"test\.tsv:2: query id 'q99' is not in"):
        load_beir(root, split="test")


def test_empty_query_names_file_and_line(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds", queries={"q1": "fine", "q2": "   "})
    with pytest.raises(DatasetError, match=r"queries\.jsonl:2: query 'q2' has empty text"):
        load_beir(root, split="test")


def test_bad_json_line_in_corpus(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds")
    path = root / "corpus.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(3, '{"_id": "x", "text": ')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:4: not valid JSON"):
        load_beir(root, split="test")


def test_duplicate_and_missing_ids_in_corpus(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "ds")
    path = root / "corpus.jsonl"
    with path.open("a") as handle:
        handle.write(json.dumps({"_id": "d1", "text": "again"}) + "\n")
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:13: duplicate document id 'd1'"):
        load_beir(root, split="test")
    path.write_text(json.dumps({"title": "t", "text": "no id"}) + "\n")
    with pytest.raises(DatasetError, match=r"corpus\.jsonl:1: missing or invalid '_id'"):
        load_beir(root, split="test")


def test_bad_qrels_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DatasetError, match=r"q\.tsv:2: expected 3 tab-separated columns"):
        load_qrels(path)
    path.write_text("q1\td1\thigh\n")
    with pytest.raises(DatasetError, match=r"q\.tsv:1: score 'high' is not a number"):
        load_qrels(path)
    path.write_text("q1\td1\t1\r\nq1\td1\t2\r\n")
    with pytest.raises(DatasetError, match=r"q\.tsv:2: duplicate judgement .*first on line 1"):
        load_qrels(path)
    path.write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(DatasetError, match="no judgements"):
        load_qrels(path)


def test_trec_style_qrels_and_float_grades(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("q1 0 d1 2\nq1 0 d2 1.0\n")
    qrels, where = load_qrels(path)
    assert qrels == {"q1": {"d1": 2, "d2": 1}}
    assert where[("q1", "d2")] == 2
