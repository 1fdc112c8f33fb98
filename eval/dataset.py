"""BEIR-format datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

The shapes are BEIR's own: corpus ``dict[doc_id, {"title": str, "text": str}]``,
queries ``dict[qid, str]``, qrels ``dict[qid, dict[doc_id, int]]``. Loading is
strict: every problem (a missing file, bad JSON, an empty query, a qrels id absent
from the corpus) raises :class:`~eval.errors.DatasetError` naming the file and line.
CRLF line endings, a UTF-8 byte-order mark, blank lines and graded relevance
scores are accepted.

Example:
    >>> data = load_beir(Path("../shared/data/scifact-train"), split="train")
    >>> len(data.corpus), len(data.queries), data.num_judgements
    (5183, 809, 919)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.errors import DatasetError

logger = logging.getLogger(__name__)

Corpus = dict[str, dict[str, str]]
Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

_QRELS_HEADER_FIRST = {"query-id", "query_id", "qid", "query"}


@dataclass(slots=True)
class BeirDataset:
    """A loaded BEIR folder, restricted to the queries judged in ``split``.

    Attributes:
        root: The dataset folder.
        split: The qrels split that was loaded (``test``, ``train``, ``dev``...).
        corpus: ``doc_id -> {"title", "text"}``.
        queries: ``qid -> text``, only queries that have judgements in the split.
        qrels: ``qid -> {doc_id: grade}``.
    """

    root: Path
    split: str
    corpus: Corpus
    queries: dict[str, str]
    qrels: Qrels

    @property
    def num_judgements(self) -> int:
        """Number of (query, document) pairs in the qrels."""
        return sum(len(docs) for docs in self.qrels.values())

    def corpus_hash(self) -> str:
        """sha256 (hex) of the corpus content: ids, titles and texts in id order."""
        digest = hashlib.sha256()
        for doc_id in sorted(self.corpus):
            doc = self.corpus[doc_id]
            for part in (doc_id, doc["title"], doc["text"]):
                digest.update(part.encode("utf-8", "surrogatepass"))
                digest.update(b"\x00")
        return digest.hexdigest()


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line; CRLF and a BOM are fine."""
    try:
        # newline=None turns \r\n and \r into \n; utf-8-sig drops a byte-order mark.
        with path.open("r", encoding="utf-8-sig", newline=None) as handle:
            for number, line in enumerate(handle, start=1):
                stripped = line.strip("\r\n")
                if stripped.strip():
                    yield number, stripped
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    """Parse one JSONL line that must hold an object; errors name the file and line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"not valid JSON ({exc.msg}, column {exc.colno})", number) from exc
    if not isinstance(value, dict):
        raise DatasetError(path, f"expected a JSON object, got {type(value).__name__}", number)
    return value


def _string_id(path: Path, number: int, record: dict[str, Any]) -> str:
    raw = record.get("_id", record.get("id"))
    if raw is None or isinstance(raw, bool) or not isinstance(raw, str | int):
        raise DatasetError(path, f"missing or invalid '_id' (got {raw!r})", number)
    doc_id = str(raw).strip()
    if not doc_id:
        raise DatasetError(path, "empty '_id'", number)
    return doc_id


def _text_field(path: Path, number: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            path, f"field {key!r} must be a string, got {type(value).__name__}", number
        )
    return value


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    return path


def load_corpus(path: Path) -> Corpus:
    """Read ``corpus.jsonl``: one ``{"_id", "title"?, "text"}`` object per line.

    Raises:
        DatasetError: missing file, bad JSON, missing ``_id``, duplicate ``_id``,
            or a document with neither title nor text.
    """
    require_file(path)
    corpus: Corpus = {}
    for number, line in iter_lines(path):
        record = json_object(path, number, line)
        doc_id = _string_id(path, number, record)
        if doc_id in corpus:
            raise DatasetError(path, f"duplicate document id {doc_id!r}", number)
        title = _text_field(path, number, record, "title")
        text = _text_field(path, number, record, "text")
        if not title.strip() and not text.strip():
            raise DatasetError(path, f"document {doc_id!r} has neither title nor text", number)
        corpus[doc_id] = {"title": title, "text": text}
    if not corpus:
        raise DatasetError(path, "no documents in the file")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    """Read ``queries.jsonl``: one ``{"_id", "text"}`` object per line.

    Raises:
        DatasetError: missing file, bad JSON, missing ``_id``, duplicate ``_id``,
            or an empty query text.
    """
    require_file(path)
    queries: dict[str, str] = {}
    for number, line in iter_lines(path):
        record = json_object(path, number, line)
        qid = _string_id(path, number, record)
        if qid in queries:
            raise DatasetError(path, f"duplicate query id {qid!r}", number)
        text = _text_field(path, number, record, "text").strip()
        if not text:
            raise DatasetError(path, f"query {qid!r} has empty text", number)
        queries[qid] = text
    if not queries:
        raise DatasetError(path, "no queries in the file")
    return queries


def _grade(path: Path, number: int, raw: str) -> int:
    try:
        value = float(raw)
    except ValueError as exc:
        raise DatasetError(path, f"score {raw!r} is not a number", number) from exc
    if not value.is_integer():
        raise DatasetError(path, f"score {raw!r} is not a whole number", number)
    return int(value)


def load_qrels(path: Path) -> tuple[Qrels, dict[tuple[str, str], int]]:
    """Read a qrels TSV: ``query-id<TAB>corpus-id<TAB>score`` with an optional header.

    Four-column TREC qrels (``qid 0 docid score``, whitespace separated) are
    accepted too. Scores are whole numbers; grades above 1 are kept for nDCG.

    Returns:
        The qrels and, for error messages, the line of each ``(qid, doc_id)`` pair.

    Raises:
        DatasetError: missing file, wrong column count, non-integer score,
            duplicate pair, or no judgements at all.
    """
    require_file(path)
    qrels: Qrels = {}
    where: dict[tuple[str, str], int] = {}
    for number, line in iter_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if number == 1 and fields and fields[0].lower() in _QRELS_HEADER_FIRST:
            continue
        if len(fields) == 4:
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise DatasetError(
                path,
                f"expected 3 tab-separated columns (query-id, corpus-id, score), "
                f"got {len(fields)}: {line!r}",
                number,
            )
        qid, doc_id, raw_score = fields
        if (qid, doc_id) in where:
            raise DatasetError(
                path,
                f"duplicate judgement for query {qid!r} and document {doc_id!r} "
                f"(first on line {where[qid, doc_id]})",
                number,
            )
        qrels.setdefault(qid, {})[doc_id] = _grade(path, number, raw_score)
        where[qid, doc_id] = number
    if not qrels:
        raise DatasetError(path, "no judgements in the file")
    return qrels, where


def available_splits(root: Path) -> list[str]:
    """The split names for which ``root/qrels/<split>.tsv`` exists."""
    folder = root / "qrels"
    return sorted(p.stem for p in folder.glob("*.tsv")) if folder.is_dir() else []


def load_beir(root: Path, split: str = "test") -> BeirDataset:
    """Load and cross-check a BEIR folder.

    Args:
        root: Folder holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/``.
        split: Which ``qrels/<split>.tsv`` to evaluate.

    Returns:
        The dataset, with ``queries`` narrowed to those judged in the split.

    Raises:
        DatasetError: any file problem, a qrels document id absent from the corpus,
            or a qrels query id absent from the queries (file and line named).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset folder not found")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = available_splits(root)
        hint = f"; available splits: {', '.join(splits)}" if splits else ""
        raise DatasetError(qrels_path, f"qrels for split {split!r} not found{hint}")
    corpus = load_corpus(root / "corpus.jsonl")
    all_queries = load_queries(root / "queries.jsonl")
    qrels, where = load_qrels(qrels_path)
    for (qid, doc_id), number in sorted(where.items(), key=lambda item: item[1]):
        if qid not in all_queries:
            raise DatasetError(
                qrels_path, f"query id {qid!r} is not in {root / 'queries.jsonl'}", number
            )
        if doc_id not in corpus:
            raise DatasetError(
                qrels_path, f"document id {doc_id!r} is not in {root / 'corpus.jsonl'}", number
            )
    queries = {qid: all_queries[qid] for qid in all_queries if qid in qrels}
    logger.info(
        "loaded %s split %s: %d documents, %d queries, %d judgements",
        root,
        split,
        len(corpus),
        len(queries),
        sum(len(d) for d in qrels.values()),
    )
    return BeirDataset(root=root, split=split, corpus=corpus, queries=queries, qrels=qrels)
