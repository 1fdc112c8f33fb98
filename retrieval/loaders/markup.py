"""Markdown (markdown-it-py) and reStructuredText (docutils) with heading paths."""

from __future__ import annotations

import functools
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.loaders.text import TextBudget, decode_text, split_paragraphs
from retrieval.types import LoaderError, SourceDocument, TextBlock

if TYPE_CHECKING:
    from docutils import nodes
    from markdown_it.token import Token

logger = logging.getLogger(__name__)

_FRONT_MATTER = re.compile(r"\A---\s*\n.*?\n(---|\.\.\.)\s*\n", re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


class _Sections:
    """Blocks grouped under a heading path; consecutive text of one section merges."""

    def __init__(self, budget: TextBudget) -> None:
        self.budget = budget
        self.headings: list[str] = []
        self.blocks: list[TextBlock] = []

    def heading(self, level: int, title: str) -> None:
        del self.headings[level - 1 :]
        self.headings.extend([""] * (level - 1 - len(self.headings)))
        self.headings.append(" ".join(title.split()))

    @property
    def section(self) -> str | None:
        parts = [h for h in self.headings if h]
        return " > ".join(parts) if parts else None

    def add(self, text: str) -> None:
        text = text.strip("\n")
        if not text.strip():
            return
        self.budget.take(text)
        section = self.section
        if self.blocks and self.blocks[-1].section == section:
            self.blocks[-1].text += "\n\n" + text
        else:
            self.blocks.append(TextBlock(text=text, section=section))


# ---------------------------------------------------------------- Markdown


def _inline_text(token: Token) -> str:
    out: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            out.append(child.content)
        elif child.type == "html_inline":
            out.append(_TAG.sub("", child.content))
        elif child.type in ("softbreak", "hardbreak"):
            out.append("\n")
        elif child.type == "image":
            out.append(child.content)
    return "".join(out)


def load_markdown(path: Path, data: bytes, source: str, budget: TextBudget) -> list[SourceDocument]:
    """Parse Markdown: headings give the section path; code blocks and tables kept as text."""
    from markdown_it import MarkdownIt

    text = _FRONT_MATTER.sub("", decode_text(data, source), count=1)
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    sections = _Sections(budget)
    title: str | None = None
    row: list[str] | None = None
    table_rows: list[str] = []
    list_depth = 0
    i = 0
    while i < len(tokens):
        token = tokens[i]
        kind = token.type
        if kind == "heading_open":
            heading = _inline_text(tokens[i + 1]) if i + 1 < len(tokens) else ""
            level = int(token.tag[1])
            if level == 1 and title is None:
                title = heading.strip()
            sections.heading(level, heading)
            i += 3  # heading_open, inline, heading_close
            continue
        if kind in ("bullet_list_open", "ordered_list_open"):
            list_depth += 1
        elif kind in ("bullet_list_close", "ordered_list_close"):
            list_depth -= 1
        elif kind == "table_open":
            table_rows = []
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close" and row is not None:
            table_rows.append(" | ".join(row))
            row = None
        elif kind == "table_close":
            sections.add("\n".join(table_rows))
        elif kind == "inline":
            content = _inline_text(token)
            if row is not None:
                row.append(" ".join(content.split()))
            elif list_depth:
                sections.add("  " * (list_depth - 1) + "- " + content)
            else:
                sections.add(content)
        elif kind in ("fence", "code_block"):
            sections.add(token.content.rstrip("\n"))
        elif kind == "html_block":
            sections.add(_TAG.sub("", token.content))
        i += 1
    if not sections.blocks:
        raise LoaderError(f"{source}: Markdown file has no text")
    return [
        SourceDocument(
            source=source,
            title=title or path.name,
            blocks=_merge_list_items(sections.blocks),
            metadata={"format": "markdown"},
        )
    ]


def _merge_list_items(blocks: list[TextBlock]) -> list[TextBlock]:
    """List items were added as paragraphs; show them on single lines instead."""
    for block in blocks:
        block.text = re.sub(r"\n\n(?=\s*- )", "\n", block.text)
    return blocks


# ---------------------------------------------------------------- reStructuredText

# Sphinx directives whose arguments and content are bookkeeping, not reading matter.
_SILENT_DIRECTIVES = frozenset(
    {
        "index",
        "sectionauthor",
        "moduleauthor",
        "codeauthor",
        "highlight",
        "tabularcolumns",
        "currentmodule",
        "toctree",
        "testsetup",
        "testcleanup",
        "default-role",
        "audit-event-table",
    }
)
_SKIP_RST = (
    "system_message",
    "comment",
    "substitution_definition",
    "target",
    "raw",
    "pending",
    "title",
    "docinfo",
)


def _register_unknown_markup(text: str) -> None:
    """Teach docutils the Sphinx roles and directives a file uses, as plain text.

    Sphinx sources (``:func:``, ``.. function::``, ``.. versionadded::``) would
    otherwise come out as error messages with their content lost.
    """
    from docutils.parsers.rst import directives, roles

    for name in set(re.findall(r"^\s*\.\.\s+([A-Za-z][\w:.+-]*)::", text, re.MULTILINE)):
        if directives._directives.get(name) is None and name not in directives._directive_registry:
            directives.register_directive(name, _generic_directive())
    for name in set(re.findall(r"(?<![\w`]):([A-Za-z][\w:.+-]*):`", text)):
        if name not in roles._roles and name not in roles._role_registry:
            roles.register_local_role(name, _sphinx_role)


def _sphinx_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: Any,
    options: Any = None,
    content: Any = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """A Sphinx cross-reference role as its visible text: ``~a.b`` -> ``b``, ``t <x>`` -> ``t``."""
    from docutils import nodes, utils

    shown = utils.unescape(text)
    titled = re.match(r"^(.*?)\s*<[^<>]+>$", shown, re.DOTALL)
    if titled and titled.group(1):
        shown = titled.group(1)
    shown = shown.lstrip("!")
    if shown.startswith("~"):
        shown = shown[1:].rsplit(".", 1)[-1]
    return [nodes.literal(rawtext, shown)], []


class _AnyOption(dict[str, Any]):
    """An option spec accepting every option as plain text (truthy even when empty)."""

    def __bool__(self) -> bool:
        return True

    def __missing__(self, key: str) -> Any:
        from docutils.parsers.rst import directives

        return directives.unchanged


def _generic_run(self: Any) -> list[nodes.Node]:
    from docutils import nodes

    if self.name in _SILENT_DIRECTIVES:
        return []
    container = nodes.container()
    if self.arguments:  # Sphinx parses arguments (e.g. of versionchanged) as inline markup
        inline, _messages = self.state.inline_text(" ".join(self.arguments), self.lineno)
        container += nodes.paragraph("", "", *inline)
    if self.content:
        self.state.nested_parse(self.content, self.content_offset, container)
    return [container]


@functools.cache
def _generic_directive() -> type:
    """A directive that keeps its argument and content as ordinary text."""
    from docutils.parsers.rst import Directive

    return type(
        "GenericDirective",
        (Directive,),
        {
            "required_arguments": 0,
            "optional_arguments": 1,
            "final_argument_whitespace": True,
            "has_content": True,
            "option_spec": _AnyOption(),
            "run": _generic_run,
        },
    )


def _rst_walk(node: nodes.Element, sections: _Sections, depth: int) -> None:
    from docutils import nodes

    for child in node.children:
        if not isinstance(child, nodes.Element) or child.tagname in _SKIP_RST:
            continue
        if isinstance(child, nodes.section):
            title = child.next_node(nodes.title)
            sections.heading(depth + 1, title.astext() if title is not None else "")
            _rst_walk(child, sections, depth + 1)
            del sections.headings[depth:]
        elif isinstance(child, (nodes.container, nodes.compound, nodes.topic, nodes.Admonition)):
            _rst_walk(child, sections, depth)
        elif isinstance(child, nodes.table):
            rows = []
            for row in child.findall(nodes.row):
                cells = [" ".join(entry.astext().split()) for entry in row.children]
                rows.append(" | ".join(cells))
            sections.add("\n".join(rows))
        else:
            for message in list(child.findall(nodes.system_message)):
                message.parent.remove(message)
            sections.add(child.astext())


def load_rst(path: Path, data: bytes, source: str, budget: TextBudget) -> list[SourceDocument]:
    """Parse reStructuredText with docutils; section titles give the section path.

    When docutils fails, falls back to the raw text (a warning is logged).
    """
    from docutils.core import publish_doctree

    text = decode_text(data, source)
    sections = _Sections(budget)
    title: str | None = None
    try:
        _register_unknown_markup(text)
        doctree = publish_doctree(
            text,
            source_path=str(path),
            settings_overrides={
                "report_level": 5,
                "halt_level": 5,
                "warning_stream": io.StringIO(),
                "file_insertion_enabled": False,
                "raw_enabled": False,
                "doctitle_xform": False,
                "input_encoding": "unicode",
            },
        )
        _rst_walk(doctree, sections, 0)
        title = _first_title(doctree)
    except LoaderError:
        raise
    except Exception as exc:  # docutils raises SystemMessage, ValueError, ... on odd input
        logger.warning("%s: docutils failed (%s); using the raw text", source, exc)
        sections = _Sections(budget)
        for paragraph in split_paragraphs(text):
            sections.add(paragraph)
    if not sections.blocks:
        raise LoaderError(f"{source}: reStructuredText file has no text")
    return [
        SourceDocument(
            source=source,
            title=title or path.name,
            blocks=sections.blocks,
            metadata={"format": "rst"},
        )
    ]


def _first_title(doctree: nodes.document) -> str | None:
    from docutils import nodes

    title = doctree.next_node(nodes.title)
    return " ".join(title.astext().split()) if title is not None else None
