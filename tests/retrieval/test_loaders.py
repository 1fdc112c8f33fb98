"""Loaders on real files: built fixtures for every format and every refusal, plus the
shared docs samples (Python docs HTML/RST, R manuals PDF)."""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Callable
from pathlib import Path

import pypdf
import pytest

from retrieval.loaders import (
    SUPPORTED_EXTENSIONS,
    LoaderLimits,
    TableOptions,
    iter_files,
    load_file,
    load_file_isolated,
)
from retrieval.types import LoaderError
from tests.retrieval.conftest import encrypt_pdf, load_sample, make_docx, make_pdf

Write = Callable[[str, bytes | str], Path]
NAV_TEXT = ("Previous topic", "Next topic", "Quick search", "This Page", "Show Source", "¶")


# ------------------------------------------------------------------ PDF


def test_pdf_pages_title_and_skipped_blank_page(write: Write) -> None:
    path = write("guide.pdf", make_pdf(["Alpha (one)\nsecond line", "", "Gamma café"], "Guide"))
    [doc] = load_file(path)
    assert doc.source == str(path.resolve())
    assert doc.title == "Guide"
    assert [(b.page, b.text) for b in doc.blocks] == [
        (1, "Alpha (one)\nsecond line"),
        (3, "Gamma café"),
    ]
    assert doc.metadata["pages"] == 3


def test_pdf_without_title_metadata_uses_file_name(write: Write) -> None:
    [doc] = load_file(write("notes.pdf", make_pdf(["Some text"])))
    assert doc.title == "notes.pdf"


def test_encrypted_pdf_is_refused(write: Write) -> None:
    path = write("locked.pdf", encrypt_pdf(make_pdf(["top secret"]), "secret"))
    with pytest.raises(LoaderError, match=r"locked\.pdf.*encrypted"):
        load_file(path)


def test_pdf_with_only_owner_password_opens(write: Write) -> None:
    path = write("owner.pdf", encrypt_pdf(make_pdf(["readable by all"]), "", "owner-pw"))
    [doc] = load_file(path)
    assert doc.blocks[0].text == "readable by all"


def test_truncated_pdf_is_not_valid(write: Write) -> None:
    data = make_pdf(["Alpha", "Beta", "Gamma"])
    path = write("broken.pdf", data[: len(data) // 3])
    with pytest.raises(LoaderError, match=r"broken\.pdf.*not a valid PDF"):
        load_file(path)


def test_pdf_with_garbage_bytes_is_not_valid(write: Write) -> None:
    with pytest.raises(LoaderError, match="not a valid PDF"):
        load_file(write("fake.pdf", b"this is not a pdf at all\n" * 10))


def test_pdf_without_text_is_reported_as_scanned(write: Write) -> None:
    with pytest.raises(LoaderError, match=r"no extractable text \(scanned\?\)"):
        load_file(write("scan.pdf", make_pdf(["", ""])))


def test_pdf_page_limit(write: Write) -> None:
    path = write("long.pdf", make_pdf(["a", "b", "c"]))
    with pytest.raises(LoaderError, match="3 pages, over the limit of 2"):
        load_file(path, limits=LoaderLimits(max_pdf_pages=2))


def test_pdf_decompression_is_capped(write: Write) -> None:
    # 3 KB on disk, 1.5 MB of page content once inflated
    path = write("zbomb.pdf", make_pdf(["fine page", "bomb " * 300_000], compress=True))
    assert path.stat().st_size < 10_000
    [doc] = load_file(path)
    assert doc.blocks[1].text.count("bomb") == 300_000
    with pytest.raises(LoaderError, match=r"zbomb\.pdf: PDF data decompresses past the limit"):
        load_file(path, limits=LoaderLimits(max_decompressed_bytes=1024 * 1024))


def test_pdf_extracted_text_is_capped(write: Write) -> None:
    path = write("big.pdf", make_pdf(["x" * 80] * 4))
    with pytest.raises(LoaderError, match="extracted text exceeds the limit of 200 characters"):
        load_file(path, limits=LoaderLimits(max_decompressed_bytes=200))


# ------------------------------------------------------------------ DOCX


def test_docx_headings_tables_and_title(tmp_path: Path) -> None:
    [doc] = load_file(make_docx(tmp_path / "setup.docx"))
    assert doc.title == "Brightwave Setup Guide"
    sections = {b.section: b.text for b in doc.blocks}
    assert sections[None] == "Welcome to the guide."
    assert sections["Install"] == "Download the installer from the portal."
    linux = sections["Install > On Linux"]
    assert "Run the shell script as root." in linux
    assert "Distribution | Package\nDebian | brightwave.deb" in linux
    assert "log file" in sections["Troubleshooting"]


def test_docx_zip_bomb_is_refused_quickly(zip_bomb: Path) -> None:
    assert zip_bomb.stat().st_size < 5 * 1024 * 1024
    with pytest.raises(LoaderError, match=r"bomb\.docx: zip bomb"):
        load_file(zip_bomb)


def test_docx_total_uncompressed_size_limit(tmp_path: Path) -> None:
    path = make_docx(tmp_path / "fine.docx")
    with pytest.raises(LoaderError, match=r"zip bomb: .* over the limit of 1000"):
        load_file(path, limits=LoaderLimits(max_decompressed_bytes=1000))


def test_docx_that_is_not_a_zip(write: Write) -> None:
    with pytest.raises(LoaderError, match=r"not a valid DOCX \(not a zip archive"):
        load_file(write("report.docx", b"plain text pretending to be a docx"))


# ------------------------------------------------------------------ HTML


def test_html_sections_main_text_and_no_chrome(write: Write) -> None:
    html = """<html><head><title>Help Centre</title><style>p {color: red}</style></head>
    <body><nav>Home | Products</nav><header>Site banner</header>
    <div class="sidebar">Related links</div>
    <main><h1>Billing</h1><p>Invoices are sent <b>monthly</b>.</p>
    <h2>Refunds</h2><p>Refunds take 5 days.</p>
    <pre>def refund(order):
    return order.total</pre>
    <table><tr><th>Plan</th><th>Price</th></tr><tr><td>Pro</td><td>10</td></tr></table>
    <form>Search: <input name=q></form><script>var x = 1;</script>
    </main><footer>Copyright</footer></body></html>"""
    [doc] = load_file(write("help.html", html))
    assert doc.title == "Help Centre"
    by_section = {b.section: b.text for b in doc.blocks}
    assert by_section["Billing"] == "Invoices are sent monthly."
    refunds = by_section["Billing > Refunds"]
    assert "Refunds take 5 days." in refunds
    assert "def refund(order):\n    return order.total" in refunds
    assert "Plan | Price\nPro | 10" in refunds
    for noise in ("Home | Products", "Site banner", "Related links", "Search:", "var x", "color"):
        assert noise not in doc.text


def test_html_title_falls_back_to_first_h1(write: Write) -> None:
    [doc] = load_file(write("page.htm", "<body><h1>Only Heading</h1><p>Body text.</p></body>"))
    assert doc.title == "Only Heading"


def test_sphinx_html_samples(docs_samples: Path) -> None:
    files = sorted((docs_samples / "html").glob("*.html"))
    assert len(files) >= 5
    for path in files:
        [doc] = load_file(path)
        assert "Python" in doc.title
        for noise in NAV_TEXT:
            assert noise not in doc.text, (path.name, noise)
        assert len({b.section for b in doc.blocks}) >= 5, path.name
        assert all(b.section for b in doc.blocks), path.name
    [json_doc] = load_file(docs_samples / "html" / "json.html")
    sections = {b.section for b in json_doc.blocks}
    assert "json — JSON encoder and decoder > Basic Usage" in sections
    assert "json.dumps(obj, *, skipkeys=False" in json_doc.text
    assert '{\n    "4": 5,\n    "6": 7\n}' in json_doc.text  # code keeps its indentation


# ------------------------------------------------------------------ Markdown and RST


def test_markdown_sections_code_and_tables(write: Write) -> None:
    md = """---
title: ignored front matter
---
# Install

Get the *package* first.

## On Linux

```bash
if true; then
    echo "ok"
fi
```

- first step
- second step

| Key | Value |
| --- | ----- |
| a   | 1     |

# Usage
Run `bw start`.
"""
    [doc] = load_file(write("README.md", md))
    assert doc.title == "Install"
    by_section = {b.section: b.text for b in doc.blocks}
    assert by_section["Install"] == "Get the package first."
    linux = by_section["Install > On Linux"]
    assert 'if true; then\n    echo "ok"\nfi' in linux
    assert "- first step\n- second step" in linux
    assert "Key | Value\na | 1" in linux
    assert by_section["Usage"] == "Run bw start."
    assert "front matter" not in doc.text


def test_rst_sections_and_sphinx_markup(write: Write) -> None:
    rst = """Guide
=====

Intro with :func:`~pkg.mod.start` and :term:`glossary entry <entry>`.

.. index:: single: hidden

.. function:: start(config)

   Start the service.

Details
-------

.. code-block:: python

   print("hi")
"""
    [doc] = load_file(write("guide.rst", rst))
    assert doc.title == "Guide"
    by_section = {b.section: b.text for b in doc.blocks}
    assert "Intro with start and glossary entry." in by_section["Guide"]
    assert "start(config)\n\nStart the service." in by_section["Guide"]
    assert 'print("hi")' in by_section["Guide > Details"]
    assert "hidden" not in doc.text
    assert "System Message" not in doc.text


def test_rst_samples_from_python_docs(docs_samples: Path) -> None:
    files = sorted((docs_samples / "rst").glob("*.rst.txt"))
    assert files
    for path in files:
        [doc] = load_file(path)
        assert doc.title != path.name
        assert len({b.section for b in doc.blocks}) >= 3
        for leftover in (":func:`", ":mod:`", ".. index::", "System Message", "ERROR/"):
            assert leftover not in doc.text, (path.name, leftover)
    [csv_doc] = load_file(docs_samples / "rst" / "csv.rst.txt")
    assert "reader(csvfile, dialect='excel', **fmtparams)" in csv_doc.text
    assert any(b.section and b.section.endswith("> Module Contents") for b in csv_doc.blocks)


# ------------------------------------------------------------------ plain text


def test_text_encodings_utf8_utf16_cp1252(write: Write) -> None:
    text = (
        "Le café était très agréable. « Naïve », déjà vu – voilà l’été. Ça coûte 5 € — "
        "c’est cher, mais la crème brûlée est délicieuse.\n"
        "Nous sommes allés à la fête du village où l’on a mangé des crêpes.\n"
    ) * 3
    latin1 = text.translate(str.maketrans({"’": "'", "€": "E", "–": "-", "—": "-"}))
    for name, data, expected in [
        ("utf8.txt", text.encode("utf-8"), text),
        ("utf16.txt", text.encode("utf-16"), text),  # with a byte-order mark
        ("cp1252.txt", text.encode("cp1252"), text),
        ("latin1.text", latin1.encode("latin-1"), latin1),
    ]:
        [doc] = load_file(write(name, data))
        assert doc.blocks[0].text == expected.strip(), name
        assert doc.title == name


def test_binary_data_in_markup_files(write: Write) -> None:
    for name in ("page.html", "notes.md", "guide.rst", "rows.csv", "rows.jsonl"):
        with pytest.raises(LoaderError, match=rf"{re.escape(name)}: binary data"):
            load_file(write(name, b"\x00\x01\x02binary\x00" * 20))


def test_binary_data_with_text_extension(write: Write) -> None:
    png_like = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
    with pytest.raises(LoaderError, match=r"image\.txt: binary data"):
        load_file(write("image.txt", png_like))
    controls = bytes([1, 2, 3, 4, 5, 6, 7, 8, 14, 15]) * 50
    with pytest.raises(LoaderError, match="binary data"):
        load_file(write("ctrl.txt", controls))


# ------------------------------------------------------------------ CSV and JSONL


def test_csv_default_columns_sniffed_dialect_and_encoding(write: Write) -> None:
    data = "id;name;notes\n1;Café;Open daily\n2;Bäckerei;\n".encode("cp1252")
    docs = load_file(write("shops.csv", data))
    assert [d.source.rsplit("#", 1)[1] for d in docs] == ["row=1", "row=2"]
    assert docs[0].blocks[0].text == "id: 1\nname: Café\nnotes: Open daily"
    assert docs[1].blocks[0].text == "id: 2\nname: Bäckerei"
    assert docs[0].title == "shops.csv row 1"


def test_csv_chosen_columns(write: Write) -> None:
    path = write("faq.csv", 'qid,question,answer,lang\nq1,How?,"Like this, simply",en\n')
    table = TableOptions(
        text_columns=["question", "answer"],
        title_column="question",
        id_column="qid",
        metadata_columns=["lang"],
    )
    [doc] = load_file(path, table=table)
    assert doc.blocks[0].text == "question: How?\nanswer: Like this, simply"
    assert doc.title == "How?"
    assert doc.metadata == {"format": "csv", "row": 1, "id": "q1", "lang": "en"}
    assert doc.source == f"{path.resolve()}#row=1"


def test_csv_unknown_column_lists_available(write: Write) -> None:
    path = write("faq.csv", "question,answer\nA?,B\n")
    message = r"unknown column 'body'; available columns: question, answer"
    with pytest.raises(LoaderError, match=message):
        load_file(path, table=TableOptions(text_columns=["body"]))


def test_jsonl_rows_metadata_and_bad_lines(write: Write) -> None:
    lines = [
        {"id": 7, "title": "Reset password", "body": "Click forgot.", "tags": ["a", "b"]},
        {"id": 8, "title": "Billing", "body": "Monthly invoices."},
    ]
    text = json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"
    table = TableOptions(
        text_columns=["body"], title_column="title", id_column="id", metadata_columns=["tags"]
    )
    docs = load_file(write("kb.jsonl", text), table=table)
    assert [d.title for d in docs] == ["Reset password", "Billing"]
    assert docs[1].source.endswith("kb.jsonl#row=3")  # the line number
    assert docs[0].metadata["tags"] == '["a", "b"]'
    assert docs[0].metadata["id"] == 7
    default = load_file(write("kb2.jsonl", text))
    assert default[0].blocks[0].text == "title: Reset password\nbody: Click forgot."

    with pytest.raises(LoaderError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_file(write("bad.jsonl", '{"a": "x"}\n{"a": \n'))
    with pytest.raises(LoaderError, match="line 1 is a JSON list, not an object"):
        load_file(write("list.jsonl", "[1, 2]\n"))
    with pytest.raises(LoaderError, match="unknown column 'text'; available columns: id, title"):
        load_file(write("kb3.jsonl", text), table=TableOptions(text_columns=["text"]))


# ------------------------------------------------------------------ refusals


def test_refusals_name_the_file_and_the_reason(write: Write, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match=r"empty\.txt: empty file"):
        load_file(write("empty.txt", b""))
    with pytest.raises(LoaderError, match=r"blank\.md: empty file"):
        load_file(write("blank.md", "  \n\n "))
    with pytest.raises(LoaderError, match=r"tool\.exe: unsupported file type '\.exe'; supported:"):
        load_file(write("tool.exe", b"MZ\x90\x00"))
    with pytest.raises(LoaderError, match=r"missing\.pdf: no such file"):
        load_file(tmp_path / "missing.pdf")
    with pytest.raises(LoaderError, match=r"nothing\.exe: no such file"):
        load_file(tmp_path / "nothing.exe")
    folder = tmp_path / "folder.md"
    folder.mkdir()
    with pytest.raises(LoaderError, match=r"folder\.md: is a directory"):
        load_file(folder)
    with pytest.raises(LoaderError, match=r"is a directory"):
        load_file(tmp_path)
    big = write("big.txt", "word " * 400)
    with pytest.raises(LoaderError, match=r"big\.txt: file is 2000 bytes, over the limit of 1000"):
        load_file(big, limits=LoaderLimits(max_file_bytes=1000))


def test_unsupported_message_lists_every_extension(write: Write) -> None:
    with pytest.raises(LoaderError) as info:
        load_file(write("x.bin", b"data"))
    for ext in SUPPORTED_EXTENSIONS:
        assert ext in str(info.value)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="parse_timeout_s must be > 0, got 0"):
        LoaderLimits(parse_timeout_s=0)
    with pytest.raises(ValueError, match="max_file_bytes must be > 0, got -1"):
        LoaderLimits(max_file_bytes=-1)


# ------------------------------------------------------------------ iter_files


def test_iter_files_expands_sorted_and_skips_hidden(write: Write, tmp_path: Path) -> None:
    write("docs/b.md", "# B")
    write("docs/a.txt", "a")
    write("docs/.secret.txt", "hidden")
    write("docs/.git/config.txt", "hidden dir")
    write("docs/sub/c.pdf", make_pdf(["c"]))
    write("docs/image.png", b"\x89PNG")
    explicit = tmp_path / "explicit.exe"
    found = list(iter_files([tmp_path / "docs", explicit]))
    docs = tmp_path / "docs"
    assert found == [docs / "a.txt", docs / "b.md", docs / "sub" / "c.pdf", explicit]
    assert list(iter_files([docs], recursive=False)) == [docs / "a.txt", docs / "b.md"]


# ------------------------------------------------------------------ shared PDF samples


def test_pdf_samples_page_counts_match_pypdf(docs_samples: Path) -> None:
    for path in sorted((docs_samples / "pdf").glob("*.pdf")):
        [doc] = load_sample(f"pdf/{path.name}")
        pages = len(pypdf.PdfReader(path).pages)
        assert doc.metadata["pages"] == pages
        numbers = [b.page for b in doc.blocks]
        assert numbers == sorted(set(numbers))
        assert all(n is not None and 1 <= n <= pages for n in numbers)
        assert len(doc.blocks) >= pages * 0.8, path.name
    [intro] = load_sample("pdf/R-intro.pdf")
    assert len(intro.blocks) > 50
    assert "An Introduction to R" in intro.text


# ------------------------------------------------------------------ isolated parsing


def test_isolated_matches_in_process(docs_samples: Path, tmp_path: Path) -> None:
    assert load_file_isolated(docs_samples / "html" / "json.html") == load_sample("html/json.html")
    docx_path = make_docx(tmp_path / "guide.docx")
    assert load_file_isolated(docx_path) == load_file(docx_path)


def test_isolated_reports_loader_errors(write: Write, zip_bomb: Path) -> None:
    with pytest.raises(LoaderError, match=r"locked\.pdf: PDF is encrypted"):
        load_file_isolated(write("locked.pdf", encrypt_pdf(make_pdf(["x"]), "pw")))
    with pytest.raises(LoaderError, match="zip bomb"):
        load_file_isolated(zip_bomb)


def test_isolated_parse_is_killed_after_timeout(docs_samples: Path) -> None:
    path = docs_samples / "pdf" / "R-intro.pdf"
    load_file_isolated(docs_samples / "html" / "classes.html")  # the fork server is warm
    with pytest.raises(LoaderError, match=r"parsing .*R-intro\.pdf timed out after 0\.3 s"):
        load_file_isolated(path, limits=LoaderLimits(parse_timeout_s=0.3))
    assert multiprocessing.active_children() == []
    with pytest.raises(LoaderError, match=r"timed out after 0\.01 s"):
        load_file_isolated(path, limits=LoaderLimits(parse_timeout_s=0.01))
    assert multiprocessing.active_children() == []
