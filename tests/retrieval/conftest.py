"""Builders of real fixture files for the loader and chunker tests.

PDFs are written by hand (a minimal valid PDF with Helvetica text pages), so the
tests need no PDF-writing dependency; pypdf then encrypts or reads them.
"""

from __future__ import annotations

import functools
import io
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from retrieval.types import SourceDocument

DOCS_SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "docs-samples"
MIB = 1024 * 1024


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[str], title: str | None = None, *, compress: bool = False) -> bytes:
    """A valid PDF with one page per string (lines split on newlines), Helvetica 12pt.

    An empty string makes a page with no text at all; ``compress`` stores the page
    contents FlateDecode-compressed, as most real PDFs do.
    """
    n = len(pages)
    page_ids = [4 + 2 * i for i in range(n)]
    content_ids = [5 + 2 * i for i in range(n)]
    kids = " ".join(f"{p} 0 R" for p in page_ids)
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for i, text in enumerate(pages):
        ops = " ".join(f"({_pdf_escape(line)}) Tj T*" for line in text.split("\n") if line)
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {ops} ET".encode("cp1252") if ops else b""
        objects[page_ids[i]] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % content_ids[i]
        )
        flate = b""
        if compress:
            stream, flate = zlib.compress(stream, 9), b" /Filter /FlateDecode"
        objects[content_ids[i]] = (
            b"<< /Length %d%s >>\nstream\n" % (len(stream), flate) + stream + b"\nendstream"
        )
    info_id = None
    if title is not None:
        info_id = 4 + 2 * n
        objects[info_id] = f"<< /Title ({_pdf_escape(title)}) >>".encode("cp1252")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = out.tell()
        out.write(b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n")
    xref = out.tell()
    size = max(objects) + 1
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
    for number in range(1, size):
        out.write(b"%010d 00000 n \n" % offsets[number])
    trailer = b"<< /Size %d /Root 1 0 R" % size
    if info_id is not None:
        trailer += b" /Info %d 0 R" % info_id
    out.write(b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def encrypt_pdf(data: bytes, user_password: str, owner_password: str | None = None) -> bytes:
    """The same PDF encrypted by pypdf (RC4, which pypdf handles without extra packages)."""
    import pypdf

    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password, owner_password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx(path: Path) -> Path:
    """A DOCX with a title, nested headings, paragraphs and a table."""
    import docx

    document = docx.Document()
    document.core_properties.title = "Brightwave Setup Guide"
    document.add_paragraph("Brightwave Setup Guide", style="Title")
    document.add_paragraph("Welcome to the guide.")
    document.add_heading("Install", level=1)
    document.add_paragraph("Download the installer from the portal.")
    document.add_heading("On Linux", level=2)
    document.add_paragraph("Run the shell script as root.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Distribution"
    table.cell(0, 1).text = "Package"
    table.cell(1, 0).text = "Debian"
    table.cell(1, 1).text = "brightwave.deb"
    document.add_heading("Troubleshooting", level=1)
    document.add_paragraph("Check the log file at /var/log/brightwave.log.")
    document.save(str(path))
    return path


def make_zip_bomb(path: Path, uncompressed_mib: int = 300) -> Path:
    """A DOCX-named zip whose document part inflates to ``uncompressed_mib`` MiB of zeros.

    Written by streaming into the archive, so it takes little time and ~300 KiB on disk.
    """
    zeros = bytes(MIB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            for _ in range(uncompressed_mib):
                member.write(zeros)
    return path


@pytest.fixture()
def write(tmp_path: Path) -> Callable[[str, bytes | str], Path]:
    """Write bytes (or UTF-8 text) to a file named ``name`` under tmp_path."""

    def _write(name: str, content: bytes | str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    return _write


@pytest.fixture(scope="session")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.docx")


@functools.cache
def load_sample(relative: str) -> list[SourceDocument]:
    """A shared docs sample loaded once per test process (callers must not mutate it)."""
    from retrieval.loaders import load_file

    return load_file(DOCS_SAMPLES / relative)


@pytest.fixture(scope="session")
def docs_samples() -> Path:
    if not DOCS_SAMPLES.is_dir():
        pytest.fail(f"shared test data missing: {DOCS_SAMPLES}")
    return DOCS_SAMPLES
