"""Plain text: encoding detection, binary refusal, and the shared text budget."""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path

from retrieval.types import LoaderError, SourceDocument, TextBlock

logger = logging.getLogger(__name__)

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Control characters other than tab, newline, carriage return, form feed.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_MAX_CONTROL_RATIO = 0.01
_PREFERRED = ("cp1252", "iso8859_15", "latin_1")
_CHAOS_TOLERANCE = 0.05


class TextBudget:
    """Counts extracted characters and refuses a file once it passes its cap."""

    def __init__(self, source: str, max_chars: int) -> None:
        self.source = source
        self.max_chars = max_chars
        self.used = 0

    def take(self, text: str) -> str:
        """Account for ``text``; raise LoaderError when the total passes the cap."""
        self.used += len(text)
        if self.used > self.max_chars:
            raise LoaderError(
                f"{self.source}: extracted text exceeds the limit of {self.max_chars} characters"
            )
        return text


def decode_text(data: bytes, source: str) -> str:
    """Decode bytes of a text file, detecting the encoding.

    A byte-order mark wins; then strict UTF-8; then charset-normalizer's best guess.

    Raises:
        LoaderError: ``binary data`` when the bytes do not look like text.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _check_text(data.decode(encoding), source)
            except UnicodeDecodeError as exc:
                raise LoaderError(
                    f"{source}: binary data (invalid {encoding} after its byte-order mark)"
                ) from exc
    if b"\x00" in data:
        raise LoaderError(f"{source}: binary data (NUL bytes) in a text file")
    try:
        return _check_text(data.decode("utf-8"), source)
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    results = from_bytes(data)
    best = results.best()
    if best is None:
        raise LoaderError(f"{source}: binary data (no text encoding fits)")
    # Detection often ranks a rarer code page (cp1257, cp1250) a hair above the far more
    # common Western one for the same Latin text; prefer Western when it is about as good.
    for match in results:
        if match.encoding in _PREFERRED and match.chaos <= best.chaos + _CHAOS_TOLERANCE:
            best = match
            break
    logger.debug("%s: detected encoding %s", source, best.encoding)
    return _check_text(str(best), source)


def _check_text(text: str, source: str) -> str:
    controls = len(_CONTROL.findall(text))
    if controls and controls > _MAX_CONTROL_RATIO * max(len(text), 1):
        raise LoaderError(f"{source}: binary data ({controls} control characters) in a text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def load_text(path: Path, data: bytes, source: str, budget: TextBudget) -> list[SourceDocument]:
    """A plain text file: one block holding the whole text (the chunker splits it)."""
    text = budget.take(decode_text(data, source).strip())
    if not text:
        raise LoaderError(f"{source}: no text (only whitespace)")
    return [SourceDocument(source=source, title=path.name, blocks=[TextBlock(text=text)])]
