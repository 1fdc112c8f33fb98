"""Make model and document text safe to render with ``st.markdown``.

Text from the model or from uploaded documents is untrusted: it must never load
an external image (a tracking pixel, or a way to leak the conversation through
an image URL) nor inject HTML. Markdown images become plain text naming the
image, and every ``<`` is escaped so no HTML tag survives; links stay links
(the reader has to click them).

Example:
    >>> print(sanitize_markdown("See ![chart](http://evil.example/x.png) <img src=x>"))
    See \\[image: chart\\] &lt;img src=x>
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

# ![alt](url "title")  and  ![alt][ref]  and  ![alt][]  (alt may hold nested brackets once)
_PARSER = MarkdownIt("commonmark")
_IMAGE = re.compile(r"!\[((?:[^\[\]]|\[[^\[\]]*\])*)\](?:\([^)]*\)|\[[^\]]*\])?")


def sanitize_markdown(text: str) -> str:
    """Markdown safe to render: no images, no raw HTML.

    Code blocks (fenced or indented, found by a CommonMark parser, so exactly
    where the renderer will see them) are kept as they are: nothing in them
    renders as HTML or an image, and ``<`` must stay readable there.

    Args:
        text: Untrusted Markdown (model output, a document snippet or title).

    Returns:
        The text with Markdown images outside code blocks replaced by
        ``[image: alt]`` (escaped so it is not a link) and every ``<`` outside
        code blocks written as ``&lt;``.
    """
    # Split lines exactly as the parser counts them (only \n, after normalising \r).
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    code = _code_block_lines(text)
    out: list[str] = []
    prose: list[str] = []
    for number, line in enumerate(text.split("\n")):
        if number in code:
            if prose:
                out.append(_sanitize_prose("\n".join(prose)))
                prose = []
            out.append(line)
        else:
            prose.append(line)
    if prose:
        out.append(_sanitize_prose("\n".join(prose)))
    return "\n".join(out)


def _code_block_lines(text: str) -> set[int]:
    """Line numbers inside fenced or indented code blocks (CommonMark block structure)."""
    if "```" not in text and "~~~" not in text and "    " not in text and "\t" not in text:
        return set()
    lines: set[int] = set()
    for token in _PARSER.parse(text):
        if token.type in ("fence", "code_block") and token.map:
            lines.update(range(token.map[0], token.map[1]))
    return lines


def _sanitize_prose(text: str) -> str:
    text = text.replace("<", "&lt;")
    text = _IMAGE.sub(_image_text, text)
    # Anything left that could still open an image (e.g. split or unusual syntax).
    return text.replace("![", "!\\[")


def _image_text(match: re.Match[str]) -> str:
    alt = match.group(1).replace("[", "").replace("]", "").strip()
    return f"\\[image: {alt}\\]" if alt else "\\[image\\]"


class StreamSanitizer:
    """Sanitizes a Markdown stream piece by piece, as ``st.write_stream`` renders it.

    A piece ending in ``!`` is held back until the next piece shows whether an
    image (``![``) starts there.

    Example:
        >>> s = StreamSanitizer()
        >>> print(s.feed("look !") + s.feed("[x](http://a/b.png)") + s.flush())
        look !\\[x](http://a/b.png)
    """

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, piece: str) -> str:
        """The safe text to show for ``piece`` (may hold its last character back)."""
        text = self._pending + piece
        self._pending = ""
        if text.endswith("!"):
            text, self._pending = text[:-1], "!"
        return text.replace("<", "&lt;").replace("![", "!\\[")

    def flush(self) -> str:
        """Whatever was held back, at the end of the stream."""
        text, self._pending = self._pending, ""
        return text
