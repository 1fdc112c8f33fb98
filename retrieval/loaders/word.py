"""DOCX files through python-docx, after a zip-bomb check of the archive."""

from __future__ import annotations

import io
import logging
import re
import zipfile
from pathlib import Path

from retrieval.loaders.options import MIB, LoaderLimits
from retrieval.loaders.text import TextBudget
from retrieval.types import LoaderError, SourceDocument, TextBlock

logger = logging.getLogger(__name__)

MAX_COMPRESSION_RATIO = 100
_RATIO_CHECK_MIN_BYTES = 1 * MIB  # small members may compress absurdly well legitimately
_HEADING_STYLE = re.compile(r"^heading\s*(\d+)$", re.IGNORECASE)


def check_zip(data: bytes, source: str, limits: LoaderLimits) -> None:
    """Refuse archives that are not zips or that would expand past the limits.

    The declared sizes bound what Python's zipfile will ever inflate (it stops at
    ``file_size`` and checks the CRC), so checking them before opening is sound.

    Raises:
        LoaderError: ``not a valid DOCX`` or ``zip bomb``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise LoaderError(f"{source}: not a valid DOCX (not a zip archive: {exc})") from exc
    with archive:
        total = 0
        for info in archive.infolist():
            total += info.file_size
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > _RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
                raise LoaderError(
                    f"{source}: zip bomb: member {info.filename!r} expands "
                    f"{info.compress_size} -> {info.file_size} bytes ({ratio:.0f}x)"
                )
        if total > limits.max_decompressed_bytes:
            raise LoaderError(
                f"{source}: zip bomb: {total} bytes uncompressed, over the limit of "
                f"{limits.max_decompressed_bytes}"
            )
        if "word/document.xml" not in archive.namelist():
            raise LoaderError(f"{source}: not a valid DOCX (no word/document.xml in the zip)")


def load_docx(
    path: Path, data: bytes, source: str, limits: LoaderLimits, budget: TextBudget
) -> list[SourceDocument]:
    """Parse a DOCX: paragraphs and tables in order, headings as the section path.

    Raises:
        LoaderError: not a zip / not a DOCX, zip bomb, or no text.
    """
    check_zip(data, source, limits)
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(io.BytesIO(data))
        headings: list[str] = []
        blocks: list[TextBlock] = []
        first_title: str | None = None
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                text = _table_text(item)
                if text:
                    _append(blocks, budget.take(text), _path(headings))
                continue
            if not isinstance(item, Paragraph):
                continue
            text = item.text.strip()
            if not text:
                continue
            style = (item.style.name if item.style is not None else "") or ""
            level = _heading_level(style)
            if level is not None:
                del headings[level - 1 :]
                headings.extend([""] * (level - 1 - len(headings)))
                headings.append(text)
                continue
            if style.lower() == "title" and first_title is None:
                first_title = text
                continue
            _append(blocks, budget.take(text), _path(headings))
        core_title = (document.core_properties.title or "").strip()
    except LoaderError:
        raise
    except Exception as exc:  # python-docx raises KeyError/ValueError/lxml errors on bad parts
        raise LoaderError(f"{source}: not a valid DOCX ({type(exc).__name__}: {exc})") from exc
    if not blocks:
        raise LoaderError(f"{source}: DOCX has no text")
    title = core_title or first_title or path.name
    return [SourceDocument(source=source, title=title, blocks=blocks, metadata={"format": "docx"})]


def _heading_level(style: str) -> int | None:
    match = _HEADING_STYLE.match(style.strip())
    return int(match.group(1)) if match else None


def _path(headings: list[str]) -> str | None:
    parts = [h for h in headings if h]
    return " > ".join(parts) if parts else None


def _append(blocks: list[TextBlock], text: str, section: str | None) -> None:
    """Merge consecutive paragraphs of one section into one block."""
    if blocks and blocks[-1].section == section:
        blocks[-1].text += "\n\n" + text
    else:
        blocks.append(TextBlock(text=text, section=section))


def _table_text(table: object) -> str:
    from docx.table import Table

    if not isinstance(table, Table):
        return ""
    lines: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            value = " ".join(cell.text.split())
            # Merged cells repeat the same object along the row; keep one copy.
            if value and (not cells or cells[-1] != value):
                cells.append(value)
        if cells:
            lines.append(" | ".join(cells))
    return "\n".join(lines)
