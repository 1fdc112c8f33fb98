"""Token-aware chunking: documents into pieces sized in the embedding model's tokens."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from retrieval.models import resolve_model_path
from retrieval.types import Chunk, RetrievalError, SourceDocument, TextBlock

if TYPE_CHECKING:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

logger = logging.getLogger(__name__)

# Paragraph, line, sentence, clause, word, then character boundaries.
_SEPARATORS = ["\n\n", "\n", ". ", "? ", "! ", "; ", ": ", ", ", " ", ""]
_LENGTH_CACHE_SIZE = 1 << 16


class ChunkingError(RetrievalError):
    """The chunker could not be built or could not load its tokenizer."""


class TokenChunker:
    """Split documents into chunks of at most ``chunk_size`` tokens of the embedding model.

    Chunks never mix two pages or two sections: consecutive blocks with the same
    page and section form a group and each group is split on its own, recursively
    on paragraph, line, sentence and word boundaries (langchain-text-splitters).
    The token count of every chunk, *including* the model's special tokens
    (``[CLS]``/``[SEP]``) and the heading line, is at most ``chunk_size``, so the
    chunk fits the model window whole.

    Example:
        >>> chunker = TokenChunker(chunk_size=256, chunk_overlap=32)
        >>> chunks = chunker.split(doc, doc_id="d1")
        >>> chunks[0].chunk_id, chunks[0].section
        ('d1:0', 'Install > On Linux')

    Args:
        tokenizer_path_or_name: A model name known to ``resolve_model_path`` or a
            folder holding a Hugging Face tokenizer.
        chunk_size: Most tokens in one chunk (special tokens and heading included).
        chunk_overlap: Tokens shared by neighbouring chunks of one group.
        include_heading: Prepend the section path line (``"Install > On Linux\\n"``)
            to each chunk's text so retrieval sees the headings.
    """

    def __init__(
        self,
        tokenizer_path_or_name: str = "all-MiniLM-L6-v2",
        chunk_size: int = 256,
        chunk_overlap: int = 32,
        *,
        include_heading: bool = True,
    ) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 16:
            raise ValueError(f"chunk_size must be an int >= 16, got {chunk_size!r}")
        if not isinstance(chunk_overlap, int) or chunk_overlap < 0:
            raise ValueError(f"chunk_overlap must be an int >= 0, got {chunk_overlap!r}")
        if chunk_overlap >= chunk_size:
            raise ValueError(
                f"chunk_overlap must be < chunk_size, got {chunk_overlap} >= {chunk_size}"
            )
        if not tokenizer_path_or_name or not tokenizer_path_or_name.strip():
            raise ValueError("tokenizer_path_or_name must be a model name or a folder")
        self.tokenizer_path_or_name = tokenizer_path_or_name
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.include_heading = include_heading
        self._lock = threading.Lock()
        self._backend: Any = None  # tokenizers.Tokenizer
        self._n_special = 0
        self._splitters: dict[int, RecursiveCharacterTextSplitter] = {}
        self._length = functools.lru_cache(maxsize=_LENGTH_CACHE_SIZE)(self._count_plain)

    # ------------------------------------------------------------ resources

    def warm_up(self) -> None:
        """Load the tokenizer (fast, Rust-backed); safe to call more than once."""
        if self._backend is not None:
            return
        with self._lock:
            if self._backend is not None:
                return
            from transformers import AutoTokenizer

            path = resolve_model_path(self.tokenizer_path_or_name)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
            except (OSError, ValueError) as exc:
                raise ChunkingError(
                    f"cannot load the tokenizer {self.tokenizer_path_or_name!r} from {path!r}: "
                    f"{exc}"
                ) from exc
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ChunkingError(
                    f"tokenizer {self.tokenizer_path_or_name!r} has no fast (Rust) version"
                )
            backend = backend.__class__.from_str(backend.to_str())  # our own copy to configure
            backend.no_truncation()
            backend.no_padding()
            self._n_special = int(tokenizer.num_special_tokens_to_add(pair=False))
            max_len = getattr(tokenizer, "model_max_length", None)
            if isinstance(max_len, int) and max_len < self.chunk_size:
                logger.warning(
                    "chunk_size %d is over the tokenizer's model_max_length %d",
                    self.chunk_size,
                    max_len,
                )
            if self.chunk_size - self._n_special < 8:
                raise ChunkingError(
                    f"chunk_size {self.chunk_size} leaves no room beside "
                    f"{self._n_special} special tokens"
                )
            self._backend = backend

    # ------------------------------------------------------------ token counting

    def _count_plain(self, text: str) -> int:
        return len(self._backend.encode(text, add_special_tokens=False).ids)

    def count_tokens(self, text: str) -> int:
        """Tokens the embedding model sees for ``text``, special tokens included."""
        self.warm_up()
        return len(self._backend.encode(text, add_special_tokens=True).ids)

    def _splitter(self, budget: int) -> RecursiveCharacterTextSplitter:
        splitter = self._splitters.get(budget)
        if splitter is None:
            from langchain_text_splitters import RecursiveCharacterTextSplitter

            splitter = RecursiveCharacterTextSplitter(
                separators=_SEPARATORS,
                keep_separator="end",
                chunk_size=budget,
                chunk_overlap=min(self.chunk_overlap, budget // 2),
                length_function=self._length,
                strip_whitespace=True,
            )
            self._splitters[budget] = splitter
        return splitter

    # ------------------------------------------------------------ splitting

    def split(self, doc: SourceDocument, doc_id: str) -> list[Chunk]:
        """Split one document into chunks with ids ``f"{doc_id}:{index}"``.

        Args:
            doc: The loaded document.
            doc_id: The document's id (the caller derives it, e.g. from the source).

        Returns:
            Chunks in reading order, each with the page and section of its group.
        """
        if not doc_id:
            raise ValueError("doc_id must be a non-empty string")
        self.warm_up()
        room = self.chunk_size - self._n_special
        pieces: list[tuple[str, TextBlock]] = []  # (chunk text, block carrying page/section)
        for page, section, text in _groups(doc.blocks):
            heading = self._heading(section, room) if self.include_heading else ""
            budget = room - (self._length(heading) if heading else 0)
            where = TextBlock(text="", page=page, section=section)
            for body in self._splitter(budget).split_text(text):
                pieces.append((f"{heading}\n{body}" if heading else body, where))
        texts = self._enforce([text for text, _ in pieces], [w for _, w in pieces], room)
        return [
            Chunk(
                chunk_id=f"{doc_id}:{index}",
                doc_id=doc_id,
                index=index,
                text=text,
                source=doc.source,
                title=doc.title,
                page=where.page,
                section=where.section,
                metadata=dict(doc.metadata),
            )
            for index, (text, where) in enumerate(texts)
        ]

    def _heading(self, section: str | None, room: int) -> str:
        """The heading line, cut to at most half the room so the body keeps space."""
        if not section:
            return ""
        limit = room // 2
        encoding = self._backend.encode(section, add_special_tokens=False)
        if len(encoding.ids) <= limit:
            return section
        return section[: encoding.offsets[limit - 1][1]].rstrip()

    def _enforce(
        self, texts: list[str], wheres: list[TextBlock], room: int
    ) -> list[tuple[str, TextBlock]]:
        """Check every chunk in one batch; cut the rare over-long one by token offsets.

        Token counts of merged pieces are sums of the pieces' counts, which is exact
        for word-piece tokenizers at whitespace but not guaranteed for every tokenizer.
        """
        out: list[tuple[str, TextBlock]] = []
        encodings = self._backend.encode_batch(texts, add_special_tokens=False) if texts else []
        for text, where, encoding in zip(texts, wheres, encodings, strict=True):
            if len(encoding.ids) <= room:
                out.append((text, where))
                continue
            logger.debug("re-cutting a chunk of %d tokens (room %d)", len(encoding.ids), room)
            out.extend((piece, where) for piece in self._hard_split(text, room))
        return out

    def _hard_split(self, text: str, room: int) -> Iterator[str]:
        """Cut ``text`` into windows of whole tokens, each verified to fit ``room``."""
        heading, sep, body = text.partition("\n") if self.include_heading else ("", "", text)
        if not sep or self._length(heading) > room // 2:
            heading, sep, body = "", "", text
        budget = room - (self._length(heading) if heading else 0)
        offsets = self._backend.encode(body, add_special_tokens=False).offsets
        window = budget
        while window > 0:
            step = max(1, window - min(self.chunk_overlap, window // 2))
            cuts: list[str] = []
            for start in range(0, len(offsets), step):
                end = min(start + window, len(offsets))
                cut = body[offsets[start][0] : offsets[end - 1][1]].strip()
                if cut:
                    cuts.append(cut)
                if end == len(offsets):  # later windows would sit inside this one
                    break
            texts = [f"{heading}{sep}{c}" for c in cuts]
            if all(self._count_plain(t) <= room for t in texts):
                yield from texts
                return
            window -= max(1, window // 10)
        raise ChunkingError(f"cannot fit text into {room} tokens")  # unreachable in practice


def _groups(blocks: list[TextBlock]) -> Iterator[tuple[int | None, str | None, str]]:
    """Consecutive non-empty blocks with the same page and section, joined by blank lines."""
    for (page, section), run in itertools.groupby(
        (b for b in blocks if b.text and b.text.strip()), key=lambda b: (b.page, b.section)
    ):
        yield page, section, "\n\n".join(b.text.strip() for b in run)
