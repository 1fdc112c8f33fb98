"""PDF files through pypdf: one block per page, with decompression caps."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.loaders.options import LoaderLimits
from retrieval.loaders.text import TextBudget
from retrieval.types import LoaderError, SourceDocument, TextBlock

if TYPE_CHECKING:
    from pypdf import PdfReader

logger = logging.getLogger(__name__)

_PYPDF_STREAM_CAP = 75_000_000  # pypdf's own default per stream
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    text = text.replace("\x00", "")
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def load_pdf(
    path: Path, data: bytes, source: str, limits: LoaderLimits, budget: TextBudget
) -> list[SourceDocument]:
    """Parse a PDF into one TextBlock per page that has text (``page`` is 1-based).

    Raises:
        LoaderError: not a valid PDF, encrypted with a password, too many pages,
            a stream that decompresses past the cap, or no extractable text.
    """
    import pypdf
    from pypdf.errors import (
        DependencyError,
        FileNotDecryptedError,
        LimitReachedError,
        PdfReadError,
    )

    if b"%PDF-" not in data[:1024]:
        raise LoaderError(f"{source}: not a valid PDF (no %PDF- header)")
    stream_cap = min(_PYPDF_STREAM_CAP, limits.max_decompressed_bytes)
    caps = {
        "zlib_maximum_output_length": stream_cap,
        "lzw_maximum_output_length": stream_cap,
        "run_length_maximum_output_length": stream_cap,
        "array_based_stream_maximum_output_length": stream_cap,
        "maximum_declared_stream_length": stream_cap,
        "stream_decoding_work_maximum_length": max(stream_cap, limits.max_decompressed_bytes),
    }
    try:
        with pypdf.apply_configuration(None, **caps):
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted:
                _decrypt(reader, source)
            n_pages = len(reader.pages)
            if n_pages > limits.max_pdf_pages:
                raise LoaderError(
                    f"{source}: PDF has {n_pages} pages, over the limit of {limits.max_pdf_pages}"
                )
            blocks: list[TextBlock] = []
            for number, page in enumerate(reader.pages, start=1):
                text = _clean(page.extract_text() or "")
                if text:
                    blocks.append(TextBlock(text=budget.take(text), page=number))
            title = _title(reader) or path.name
    except LoaderError:
        raise
    except LimitReachedError as exc:
        raise LoaderError(
            f"{source}: PDF data decompresses past the limit of {stream_cap} bytes "
            "(decompression bomb?)"
        ) from exc
    except FileNotDecryptedError as exc:
        raise LoaderError(f"{source}: PDF is encrypted and needs a password") from exc
    except DependencyError as exc:
        raise LoaderError(f"{source}: PDF is encrypted with an unsupported scheme: {exc}") from exc
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoaderError(f"{source}: not a valid PDF ({exc})") from exc
    except Exception as exc:  # pypdf raises a wide range of errors on broken input
        raise LoaderError(f"{source}: not a valid PDF ({type(exc).__name__}: {exc})") from exc
    if not blocks:
        raise LoaderError(f"{source}: PDF has no extractable text (scanned?)")
    logger.debug("%s: %d pages, %d with text", source, n_pages, len(blocks))
    return [
        SourceDocument(
            source=source,
            title=title,
            blocks=blocks,
            metadata={"format": "pdf", "pages": n_pages},
        )
    ]


def _decrypt(reader: PdfReader, source: str) -> None:
    from pypdf import PasswordType

    # Many PDFs are "encrypted" only with an owner password; the empty user password opens them.
    if reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise LoaderError(f"{source}: PDF is encrypted and needs a password")


def _title(reader: PdfReader) -> str | None:
    try:
        meta = reader.metadata
        title = meta.title if meta is not None else None
    except Exception:  # broken metadata must not lose the text
        logger.debug("unreadable PDF metadata", exc_info=True)
        return None
    if isinstance(title, str) and title.strip():
        return title.strip()
    return None
