"""A tokenizer built offline from a GGUF file's metadata alone.

The vocabulary, merges and special tokens come from ``tokenizer.ggml.*`` keys; the
``tokenizers`` object is assembled with transformers' GGUF tokenizer converter (the
same code ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` runs), so encodings
match Hugging Face's. The chat template is rendered in a sandboxed jinja2 env.

Example:
    >>> tok = EngineTokenizer.from_metadata(GGUFFile.open(path).metadata.tokenizer)
    >>> ids = tok.encode("Hello world")
    >>> tok.decode(ids)
    'Hello world'
    >>> prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from llm_backend.engine.errors import EngineError
from llm_backend.engine.gguf_reader import TokenizerMetadata

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Token texts that end a turn in common chat formats; added to eos ids when in the vocab.
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")
_CONTROL_TOKEN_TYPE = 3


class TemplateError(EngineError):
    """The chat template failed to render (it raised, or the messages are malformed)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template does not parse: {exc}") from exc


def _build_backend(meta: TokenizerMetadata, architecture: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from the GGUF vocabulary, via transformers' converter."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict: dict[str, Any] = {
        "tokenizer_type": meta.model,
        "pre_tokenizer_type": meta.pre,
        "tokens": meta.tokens,
        "bos_token_id": meta.bos_token_id,
        "eos_token_id": meta.eos_token_id,
        "unk_token_id": meta.unk_token_id,
        "pad_token_id": meta.pad_token_id,
    }
    if meta.merges or meta.model == "gpt2":
        tokenizer_dict["merges"] = meta.merges
    if meta.scores is not None:
        tokenizer_dict["scores"] = meta.scores
    if meta.token_types is not None:
        tokenizer_dict["token_type"] = meta.token_types
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as exc:
        raise EngineError(f"cannot build tokenizer {meta.model!r} from GGUF: {exc}") from exc
    return backend


class EngineTokenizer:
    """Encode, decode and chat-format text for one GGUF model.

    Attributes:
        eos_token_ids: Ids that end generation (the file's eos/eot plus end-of-turn tokens).
        bos_token_id: The beginning-of-sequence id, or None.
        vocab_size: Number of ids the model's embedding has.
        add_bos_token: Whether prompts should start with ``bos_token_id``.
    """

    def __init__(self, backend: Tokenizer, meta: TokenizerMetadata) -> None:
        self._backend = backend
        self._meta = meta
        self.vocab_size = len(meta.tokens)
        self.bos_token_id = meta.bos_token_id
        self.add_bos_token = meta.add_bos_token
        self.pad_token_id = meta.pad_token_id
        self.eos_token_ids: set[int] = {
            i for i in (meta.eos_token_id, meta.eot_token_id) if i is not None
        }
        types = meta.token_types or []
        for index, text in enumerate(meta.tokens):
            if text in _END_OF_TURN_TEXTS and (not types or types[index] == _CONTROL_TOKEN_TYPE):
                self.eos_token_ids.add(index)
        self.bos_token = self._text_of(meta.bos_token_id)
        self.eos_token = self._text_of(meta.eos_token_id)
        self.chat_template_source = meta.chat_template or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template_source)

    @classmethod
    def from_metadata(cls, meta: TokenizerMetadata, architecture: str = "llama") -> EngineTokenizer:
        """Build from a GGUF file's tokenizer metadata (offline, no files written)."""
        return cls(_build_backend(meta, architecture), meta)

    def _text_of(self, token_id: int | None) -> str:
        if token_id is None or not 0 <= token_id < len(self._meta.tokens):
            return ""
        return self._meta.tokens[token_id]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a BOS is prepended when the
        model wants one. Special-token texts such as ``<|im_start|>`` map to their ids."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored in the file."""
        return self._text_of(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (and ``tools``) with the model's chat template.

        Raises:
            TemplateError: The template raised or could not render the messages.
        """
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TemplateError(
                    f"message {index} must be a dict with a 'role', got {message!r}"
                )
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise TemplateError(f"chat template failed to render: {exc}") from exc

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A fresh streaming decoder over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turn a stream of token ids into text chunks without splitting characters.

    Byte-level BPE can end a token in the middle of a multi-byte UTF-8 character
    (the partial text decodes to U+FFFD); such text is held back until the character
    completes. Re-decoding a short window of recent ids keeps spacing right.

    Example:
        >>> stream = tokenizer.incremental_decoder()
        >>> "".join(stream.push([i]) for i in ids) + stream.flush() == tokenizer.decode(ids)
        True
    """

    _WINDOW = 6  # ids of left context re-decoded with the new ones

    def __init__(self, tokenizer: EngineTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this have been emitted as text

    def push(self, new_ids: list[int] | int) -> str:
        """Add ids; return the newly completed text (possibly empty)."""
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        self._ids.extend(new_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = decode(self._ids[self._prefix_offset :], self._skip)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character, or nothing visible yet
        new_text = full_text[len(prefix_text) :]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - self._WINDOW)
        return new_text

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), decoded as is."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = decode(self._ids[self._prefix_offset :], self._skip)
        self._read_offset = len(self._ids)
        self._prefix_offset = self._read_offset
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
