"""The Markdown sanitizer: no external image and no HTML survive, text stays readable."""

from __future__ import annotations

import random

import pytest

from ui.sanitize import StreamSanitizer, sanitize_markdown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain **bold** [link](http://a.example)", "plain **bold** [link](http://a.example)"),
        ("see ![chart](http://evil.example/x.png)", "see \\[image: chart\\]"),
        ('![a [b] c](http://e/x.png "t") end', "\\[image: a b c\\] end"),
        ("![](http://e/x.png)", "\\[image\\]"),
        ("ref ![logo][1]\n\n[1]: http://e/l.png", "ref \\[image: logo\\]\n\n[1]: http://e/l.png"),
        ("<img src=http://e/x.png>", "&lt;img src=http://e/x.png>"),
        ("<script>alert(1)</script>", "&lt;script>alert(1)&lt;/script>"),
        ("a < b and c > d", "a &lt; b and c > d"),
        ("unclosed ![alt(http://x", "unclosed !\\[alt(http://x"),
    ],
)
def test_sanitize_markdown(text: str, expected: str) -> None:
    assert sanitize_markdown(text) == expected


def test_code_blocks_stay_readable() -> None:
    text = "Use this:\n\n```html\n<img src=x.png>\n![a](b)\n```\n\n<b>after</b>"
    assert sanitize_markdown(text) == (
        "Use this:\n\n```html\n<img src=x.png>\n![a](b)\n```\n\n&lt;b>after&lt;/b>"
    )
    indented = "code:\n\n    if a < b:\n        pass\n\ntext <i>"
    assert sanitize_markdown(indented) == "code:\n\n    if a < b:\n        pass\n\ntext &lt;i>"


@pytest.mark.parametrize(
    "attack",
    [
        # A fence opened inside a blockquote ends with it: the image line is prose.
        "> ```\n![x](http://evil.invalid/p.png)\n```",
        # Line separators other than \n must not shift the code lines.
        "```\n\u2028\x0b\x0c\x1c\x85```\n![x](http://evil.invalid/p.png)\n",
        "a\r![x](http://evil.invalid/p.png)\r\n```\ncode\n```",
        # Escaped backticks are not code.
        "\\`![x](http://evil.invalid/p.png)\\`",
    ],
)
def test_code_detection_cannot_be_used_to_smuggle_an_image(attack: str) -> None:
    out = sanitize_markdown(attack)
    assert not _rendered_kinds(out) & {"image", "html_inline", "html_block"}, out


def _unsafe(text: str) -> bool:
    return "![" in text or "<" in text


def test_sanitized_text_never_keeps_image_or_tag_openers() -> None:
    rng = random.Random(7)
    alphabet = ["!", "[", "]", "(", ")", "<", ">", "a", " ", "img", "http://x/y.png", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert not _unsafe(sanitize_markdown(text)), text


def _rendered_kinds(markdown: str) -> set[str]:
    """Token types a CommonMark renderer sees in ``markdown`` (blocks and inline children)."""
    from markdown_it import MarkdownIt

    kinds = set()
    for token in MarkdownIt("commonmark").parse(markdown):
        kinds.add(token.type)
        kinds.update(child.type for child in token.children or [])
    return kinds


def test_rendered_sanitized_text_has_no_image_or_html() -> None:
    """Fuzz with code fences too: the parsed result never holds an image or raw HTML."""
    rng = random.Random(11)
    alphabet = [
        "!",
        "[",
        "]",
        "(",
        ")",
        "<",
        ">",
        "a",
        " ",
        "img",
        "x.png",
        "\n",
        "```",
        "> ",
        "    ",
        "`",
        "\\",
        "~~~",
        "<img src=x.png>",
        "![a](x.png)",
        "- ",
        "\r",
        "\u2028",
    ]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        kinds = _rendered_kinds(sanitize_markdown(text))
        assert not kinds & {"image", "html_inline", "html_block"}, (text, kinds)
    # The check itself can fail: unsanitized text does show images and HTML.
    assert "image" in _rendered_kinds("![a](x.png)")
    assert "html_inline" in _rendered_kinds("a <b>c</b>")


def test_stream_sanitizer_is_safe_however_the_text_is_split() -> None:
    text = "Hi ![p](http://t.invalid/p.png) and <img src=x> ok!"
    rng = random.Random(3)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        sanitizer = StreamSanitizer()
        out = "".join(sanitizer.feed(p) for p in pieces) + sanitizer.flush()
        assert not _unsafe(out), pieces
        # Nothing is lost: unescaping gives the original text back.
        assert out.replace("&lt;", "<").replace("!\\[", "![") == text


def test_stream_sanitizer_holds_a_trailing_bang_until_the_next_piece() -> None:
    sanitizer = StreamSanitizer()
    assert sanitizer.feed("wow!") == "wow"
    assert sanitizer.feed(" yes") == "! yes"
    assert sanitizer.feed("!") == ""
    assert sanitizer.flush() == "!"
