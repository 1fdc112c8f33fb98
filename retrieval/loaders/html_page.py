"""HTML pages: main text and heading paths, navigation and chrome dropped."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.loaders.text import TextBudget, decode_text
from retrieval.types import LoaderError, SourceDocument, TextBlock

if TYPE_CHECKING:
    from bs4 import BeautifulSoup, Tag

logger = logging.getLogger(__name__)

_DROP_TAGS = (
    "nav",
    "header",
    "footer",
    "script",
    "style",
    "noscript",
    "form",
    "button",
    "select",
    "input",
    "textarea",
    "template",
    "iframe",
    "svg",
)
_DROP_ROLES = {"navigation", "search", "banner", "contentinfo", "complementary"}
# Sidebars and page chrome of common generators (Sphinx, MkDocs, Docusaurus, WordPress).
_DROP_CLASSES = {
    "sphinxsidebar",
    "related",
    "headerlink",
    "mobile-nav",
    "sidebar",
    "side-bar",
    "toc",
    "breadcrumb",
    "breadcrumbs",
    "navbar",
    "menu",
    "skip-link",
    "footer",
    "cookie-banner",
    "inline-search",
    "version_switcher_placeholder",
    "language_switcher_placeholder",
}
_MAIN_SELECTORS = ("main", "[role=main]", "article", "div.body", "div.document")
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCK_TAGS = {
    "p",
    "div",
    "section",
    "article",
    "main",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "blockquote",
    "figure",
    "figcaption",
    "br",
    "hr",
    "tr",
    "aside",
    "details",
    "summary",
    "caption",
}
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


class _Collector:
    """Walks the content tree, cutting a new block at every heading."""

    def __init__(self, budget: TextBudget) -> None:
        self.budget = budget
        self.headings: list[str] = []
        self.blocks: list[TextBlock] = []
        self.parts: list[tuple[str, bool]] = []  # (text, is preformatted)

    @property
    def section(self) -> str | None:
        parts = [h for h in self.headings if h]
        return " > ".join(parts) if parts else None

    def add(self, text: str) -> None:
        self.parts.append((text, False))

    def flush(self) -> None:
        pieces: list[str] = []
        run: list[str] = []  # consecutive ordinary text, normalised together
        for text, preformatted in [*self.parts, ("", True)]:
            if not preformatted:
                run.append(text)
                continue
            lines = "".join(run).split("\n")
            pieces.append("\n".join(_SPACES.sub(" ", line).strip() for line in lines))
            run = []
            if text:  # code keeps its indentation
                pieces.append("\n\n" + "\n".join(ln.rstrip() for ln in text.split("\n")) + "\n\n")
        joined = re.sub(r"\n{3,}", "\n\n", "".join(pieces)).strip("\n ")
        self.parts = []
        if joined:
            self.blocks.append(TextBlock(text=self.budget.take(joined), section=self.section))

    def walk(self, node: Tag) -> None:
        from bs4 import NavigableString, Tag
        from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

        for child in node.children:
            if isinstance(child, (Comment, Doctype, Declaration, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                self.add(str(child).replace("\n", " "))
                continue
            if not isinstance(child, Tag):
                continue
            name = child.name.lower()
            if name in _HEADINGS:
                self.flush()
                level = _HEADINGS[name]
                title = " ".join(child.get_text(" ").split())
                del self.headings[level - 1 :]
                self.headings.extend([""] * (level - 1 - len(self.headings)))
                self.headings.append(title)
            elif name == "pre":
                self.parts.append((child.get_text().strip("\n"), True))
            elif name == "table":
                self.add("\n\n" + _table_text(child) + "\n\n")
            elif name in _BLOCK_TAGS:
                self.add("\n")
                self.walk(child)
                self.add("\n")
            else:
                self.walk(child)


def _table_text(table: Tag) -> str:
    lines = []
    for row in table.find_all("tr"):
        cells = [" ".join(c.get_text(" ").split()) for c in row.find_all(["th", "td"])]
        if any(cells):
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def _is_chrome(tag: Tag) -> bool:
    if tag.name in _DROP_TAGS:
        return True
    if tag.name == "aside":
        # Footnotes are content; other asides are not.
        return "footnote" not in " ".join(_classes(tag))
    role = str(tag.get("role") or "").lower()
    if role in _DROP_ROLES:
        return True
    return any(c.lower() in _DROP_CLASSES for c in _classes(tag))


def _classes(tag: Tag) -> list[str]:
    value = tag.get("class")
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _strip_chrome(soup: BeautifulSoup) -> None:
    from bs4 import Tag

    doomed = [t for t in soup.find_all(True) if isinstance(t, Tag) and _is_chrome(t)]
    for tag in doomed:
        if not tag.decomposed:
            tag.decompose()


def load_html(path: Path, data: bytes, source: str, budget: TextBudget) -> list[SourceDocument]:
    """Parse an HTML page into blocks, one per heading section.

    Raises:
        LoaderError: binary data, or no text once navigation is removed.
    """
    from bs4 import BeautifulSoup

    html = decode_text(data, source)
    try:
        soup = BeautifulSoup(html, "lxml")
    except Exception as exc:  # lxml can fail on pathological input
        raise LoaderError(f"{source}: not a valid HTML page ({type(exc).__name__}: {exc})") from exc
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text(" ").split()) if title_tag is not None else ""
    _strip_chrome(soup)
    root = None
    for selector in _MAIN_SELECTORS:
        root = soup.select_one(selector)
        if root is not None:
            break
    if root is None:
        root = soup.body or soup
    if not title:
        h1 = root.find("h1")
        title = " ".join(h1.get_text(" ").split()) if h1 is not None else path.name
    collector = _Collector(budget)
    collector.walk(root)
    collector.flush()
    if not collector.blocks:
        raise LoaderError(f"{source}: HTML page has no text outside navigation")
    return [
        SourceDocument(
            source=source, title=title, blocks=collector.blocks, metadata={"format": "html"}
        )
    ]
