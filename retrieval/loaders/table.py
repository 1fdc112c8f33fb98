"""CSV and JSONL files: one document per row, columns chosen by TableOptions."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from retrieval.loaders.options import TableOptions
from retrieval.loaders.text import TextBudget, decode_text
from retrieval.types import LoaderError, SourceDocument, TextBlock

logger = logging.getLogger(__name__)

_SNIFF_BYTES = 64 * 1024


def _scalar(value: Any) -> str | int | float | bool | None:
    """Metadata holds strings, numbers and bools only; anything else becomes JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, ensure_ascii=False)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False)


def _rows_to_documents(
    rows: Iterable[tuple[int, dict[str, Any]]],
    path: Path,
    source: str,
    options: TableOptions,
    fmt: str,
    budget: TextBudget,
) -> list[SourceDocument]:
    reserved = {options.title_column, options.id_column, *(options.metadata_columns or [])}
    documents: list[SourceDocument] = []
    skipped = 0
    for number, row in rows:
        if options.text_columns is not None:
            columns = options.text_columns
        else:  # default: every string column not used for title/id/metadata
            columns = [k for k, v in row.items() if isinstance(v, str) and k not in reserved]
        lines = [f"{col}: {_as_text(row.get(col))}" for col in columns if _as_text(row.get(col))]
        if not lines:
            skipped += 1
            continue
        text = budget.take("\n".join(lines))
        metadata: dict[str, Any] = {"format": fmt, "row": number}
        if options.id_column is not None:
            metadata["id"] = _scalar(row.get(options.id_column))
        for col in options.metadata_columns or []:
            metadata[col] = _scalar(row.get(col))
        title = _as_text(row.get(options.title_column)) if options.title_column else ""
        documents.append(
            SourceDocument(
                source=f"{source}#row={number}",
                title=title or f"{path.name} row {number}",
                blocks=[TextBlock(text=text)],
                metadata=metadata,
            )
        )
    if skipped:
        logger.info("%s: skipped %d rows with no text in the text columns", source, skipped)
    if not documents:
        raise LoaderError(f"{source}: no row has text in the text columns")
    return documents


def load_csv(
    path: Path, data: bytes, source: str, options: TableOptions, budget: TextBudget
) -> list[SourceDocument]:
    """A CSV (or TSV, ``;``- or ``|``-separated) file with a header row.

    Raises:
        LoaderError: no header, unknown column named, a malformed row, or no text.
    """
    text = decode_text(data, source)
    sample = text[:_SNIFF_BYTES]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    try:
        header = [h for h in (reader.fieldnames or []) if h is not None]
    except csv.Error as exc:
        raise LoaderError(f"{source}: not a valid CSV file ({exc})") from exc
    if not header:
        raise LoaderError(f"{source}: CSV file has no header row")
    options.check_columns(header, source)

    def rows() -> Iterable[tuple[int, dict[str, Any]]]:
        number = 0
        try:
            for row in reader:
                number += 1
                yield number, {k: v for k, v in row.items() if k is not None}
        except csv.Error as exc:
            raise LoaderError(f"{source}: not a valid CSV file (row {number + 1}: {exc})") from exc

    return _rows_to_documents(rows(), path, source, options, "csv", budget)


def load_jsonl(
    path: Path, data: bytes, source: str, options: TableOptions, budget: TextBudget
) -> list[SourceDocument]:
    """A JSON Lines file: one JSON object per non-blank line; ``row`` is the line number.

    Raises:
        LoaderError: a line that is not a JSON object (naming the line), an unknown
            column, or no text.
    """
    parsed: list[tuple[int, dict[str, Any]]] = []
    keys: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(decode_text(data, source).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoaderError(f"{source}: line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise LoaderError(
                f"{source}: line {number} is a JSON {type(obj).__name__}, not an object"
            )
        for key in obj:
            if key not in seen:
                seen.add(key)
                keys.append(key)
        parsed.append((number, obj))
    if not parsed:
        raise LoaderError(f"{source}: JSONL file has no records")
    options.check_columns(keys, source)
    return _rows_to_documents(parsed, path, source, options, "jsonl", budget)
