"""Limits and per-format options that every loader takes."""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.types import LoaderError

MIB = 1024 * 1024


@dataclass(slots=True)
class LoaderLimits:
    """Resource caps that protect ingestion from hostile or broken files.

    Attributes:
        max_file_bytes: Largest file accepted, checked before reading.
        max_decompressed_bytes: Cap on decompressed data (DOCX zip members, PDF
            streams) and on the characters of text extracted from one file.
        max_pdf_pages: PDFs with more pages are refused.
        parse_timeout_s: Used by ``load_file_isolated``: the child process parsing
            the file is killed after this many seconds.
    """

    max_file_bytes: int = 50 * MIB
    max_decompressed_bytes: int = 200 * MIB
    max_pdf_pages: int = 5000
    parse_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_decompressed_bytes", "max_pdf_pages"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.parse_timeout_s <= 0:
            raise ValueError(f"parse_timeout_s must be > 0, got {self.parse_timeout_s}")


@dataclass(slots=True)
class TableOptions:
    """How CSV and JSONL rows become documents (one document per row).

    Attributes:
        text_columns: Columns whose values make the text, as ``"col: value"`` lines.
            None means every string column except the id/title/metadata ones.
        title_column: Column holding the row's title; default ``"<file> row <n>"``.
        id_column: Column holding a stable row id, stored as ``metadata["id"]``.
        metadata_columns: Columns copied into the document metadata.
    """

    text_columns: list[str] | None = None
    title_column: str | None = None
    id_column: str | None = None
    metadata_columns: list[str] | None = None

    def named_columns(self) -> list[str]:
        """Every column the caller named, in a stable order."""
        names: list[str] = []
        for name in [
            *(self.text_columns or []),
            self.title_column,
            self.id_column,
            *(self.metadata_columns or []),
        ]:
            if name is not None and name not in names:
                names.append(name)
        return names

    def check_columns(self, available: list[str], source: str) -> None:
        """Raise LoaderError naming any named column missing from ``available``."""
        missing = [name for name in self.named_columns() if name not in available]
        if missing:
            raise LoaderError(
                f"{source}: unknown column {', '.join(repr(m) for m in missing)}; "
                f"available columns: {', '.join(available) or '(none)'}"
            )
