"""Loaders: turn files into ``SourceDocument``s with page/section metadata.

Formats: PDF (pypdf), DOCX (python-docx), HTML, Markdown, reStructuredText, plain
text, CSV and JSONL (a document per row). Every bad input raises ``LoaderError``
with a one-line reason that names the file.

Example:
    >>> from retrieval.loaders import iter_files, load_file_isolated
    >>> for path in iter_files(["docs/"]):
    ...     for doc in load_file_isolated(path):
    ...         print(doc.title, len(doc.blocks))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from retrieval.loaders import html_page, markup, pdf, word
from retrieval.loaders import table as tables
from retrieval.loaders.isolated import load_file_isolated
from retrieval.loaders.options import LoaderLimits, TableOptions
from retrieval.loaders.text import TextBudget, load_text
from retrieval.types import LoaderError, SourceDocument

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "LoaderError",
    "LoaderLimits",
    "TableOptions",
    "file_kind",
    "iter_files",
    "load_file",
    "load_file_isolated",
]

logger = logging.getLogger(__name__)

_KINDS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".jsonl": "jsonl",
}
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_KINDS)


def file_kind(path: str | Path) -> str | None:
    """The loader a path would use (``"pdf"``, ``"rst"``, ...), or None if unsupported.

    Sphinx's ``_sources`` files (``name.rst.txt``) count as reStructuredText.
    """
    name = Path(path).name.lower()
    if name.endswith(".rst.txt"):
        return "rst"
    return _KINDS.get(Path(name).suffix)


def _read(path: Path, source: str, limits: LoaderLimits) -> bytes:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise LoaderError(f"{source}: no such file") from None
    except PermissionError:
        raise LoaderError(f"{source}: permission denied") from None
    except OSError as exc:
        raise LoaderError(f"{source}: cannot read ({exc.strerror or exc})") from None
    if path.is_dir():
        raise LoaderError(f"{source}: is a directory, not a file (use iter_files to expand it)")
    if not path.is_file():
        raise LoaderError(f"{source}: not a regular file")
    if stat.st_size > limits.max_file_bytes:
        raise LoaderError(
            f"{source}: file is {stat.st_size} bytes, over the limit of "
            f"{limits.max_file_bytes} bytes"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(limits.max_file_bytes + 1)
    except PermissionError:
        raise LoaderError(f"{source}: permission denied") from None
    except OSError as exc:
        raise LoaderError(f"{source}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limits.max_file_bytes:  # it grew after stat
        raise LoaderError(f"{source}: file is over the limit of {limits.max_file_bytes} bytes")
    if not data.strip():
        raise LoaderError(f"{source}: empty file")
    return data


def load_file(
    path: str | Path,
    *,
    limits: LoaderLimits | None = None,
    table: TableOptions | None = None,
) -> list[SourceDocument]:
    """Parse one file in this process into documents (a CSV/JSONL row each, else one).

    Args:
        path: The file.
        limits: Resource caps; defaults to ``LoaderLimits()``.
        table: Column choices for CSV/JSONL; defaults to ``TableOptions()``.

    Returns:
        The documents, with ``source`` the resolved absolute path (``#row=N`` for rows).

    Raises:
        LoaderError: with a one-line reason naming the file, for every bad input.
    """
    limits = limits or LoaderLimits()
    path = Path(path).expanduser()
    source = str(path.resolve())
    kind = file_kind(path)
    if kind is None and not path.exists():
        raise LoaderError(f"{source}: no such file")
    if kind is None and not path.is_dir():
        raise LoaderError(
            f"{source}: unsupported file type {path.suffix.lower() or '(no extension)'!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_EXTENSIONS))}"
        )
    data = _read(path, source, limits)
    budget = TextBudget(source, limits.max_decompressed_bytes)
    documents = _dispatch(kind or "", path, data, source, limits, table or TableOptions(), budget)
    logger.debug("loaded %s: %d document(s)", source, len(documents))
    return documents


def _dispatch(
    kind: str,
    path: Path,
    data: bytes,
    source: str,
    limits: LoaderLimits,
    table: TableOptions,
    budget: TextBudget,
) -> list[SourceDocument]:
    if kind == "pdf":
        return pdf.load_pdf(path, data, source, limits, budget)
    if kind == "docx":
        return word.load_docx(path, data, source, limits, budget)
    if kind == "html":
        return html_page.load_html(path, data, source, budget)
    if kind == "markdown":
        return markup.load_markdown(path, data, source, budget)
    if kind == "rst":
        return markup.load_rst(path, data, source, budget)
    if kind == "csv":
        return tables.load_csv(path, data, source, table, budget)
    if kind == "jsonl":
        return tables.load_jsonl(path, data, source, table, budget)
    return load_text(path, data, source, budget)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def iter_files(paths: Iterable[str | Path], *, recursive: bool = True) -> Iterator[Path]:
    """Expand directories into the supported files inside them.

    Files named explicitly are yielded as given (even unsupported or missing ones,
    so ``load_file`` reports them). Directories yield their supported files in
    sorted order, skipping hidden files and hidden directories.
    """
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            yield path
            continue
        if not recursive:
            for child in sorted(path.iterdir()):
                if child.is_file() and not _hidden(child.name) and file_kind(child):
                    yield child
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for name in sorted(files):
                child = Path(root) / name
                if not _hidden(name) and file_kind(child) and child.is_file():
                    yield child
