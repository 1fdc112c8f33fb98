"""EngineTokenizer built from GGUF metadata, against transformers' tokenizer for the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_backend.engine.gguf_reader import GGUFFile, TokenizerMetadata
from llm_backend.engine.tokenizer import EngineTokenizer, TemplateError

pytestmark = pytest.mark.integration

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "Numbers 1234567 and 3.14159, émigré café, naïve — “quotes”",
    "日本語のテキスト and emoji 🙂👍🏽",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path: Path) -> EngineTokenizer:
    meta = GGUFFile.open(smollm2_gguf_path).metadata
    return EngineTokenizer.from_metadata(meta.tokenizer, meta.architecture)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


def test_encode_matches_transformers(tokenizer: EngineTokenizer, hf_tokenizer: Any) -> None:
    for text in TEXTS:
        ours = tokenizer.encode(text)
        assert ours == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ours, skip_special_tokens=False) == text


def test_special_tokens_and_ids(tokenizer: EngineTokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert 2 in tokenizer.eos_token_ids  # <|im_end|>
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.decode([2, *tokenizer.encode(" ok")]) == " ok"  # specials skipped


def test_chat_template_matches_transformers(tokenizer: EngineTokenizer, hf_tokenizer: Any) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours == theirs
    rendered = tokenizer.apply_chat_template(conversations[0])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the file's own template


def test_chatml_fallback_and_template_errors() -> None:
    meta = TokenizerMetadata(model="gpt2", tokens=_byte_tokens(), merges=[], eos_token_id=257)
    tok = EngineTokenizer.from_metadata(meta)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match="message 0 must be a dict with a 'role'"):
        tok.apply_chat_template([{"content": "no role"}])
    meta.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(TemplateError, match="only user turns"):
        EngineTokenizer.from_metadata(meta).apply_chat_template([{"role": "user", "content": "x"}])
    meta.chat_template = "{% for %}"
    with pytest.raises(TemplateError, match="does not parse"):
        EngineTokenizer.from_metadata(meta)


def test_chat_template_is_sandboxed() -> None:
    meta = TokenizerMetadata(model="gpt2", tokens=_byte_tokens(), merges=[])
    meta.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        EngineTokenizer.from_metadata(meta).apply_chat_template([{"role": "user", "content": "x"}])


def test_incremental_decoder_never_splits_characters(tokenizer: EngineTokenizer) -> None:
    text = "Grüße 🙂👍🏽 日本語 — done. " * 3
    ids = tokenizer.encode(text)
    stream = tokenizer.incremental_decoder()
    chunks = [stream.push(token) for token in ids]
    chunks.append(stream.flush())
    assert "".join(chunks) == text
    assert all("\ufffd" not in chunk for chunk in chunks)
    # Some emoji take several byte-level tokens: at least one push must have held text back.
    assert any(chunk == "" for chunk in chunks[:-1])


def test_tools_reach_the_template() -> None:
    meta = TokenizerMetadata(model="gpt2", tokens=_byte_tokens(), merges=[])
    meta.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }}"
        "{{ t | tojson }}{% endfor %}{% endif %}{{ messages[0]['content'] }}"
    )
    tool = {"type": "function", "function": {"name": "search", "parameters": {}}}
    out = EngineTokenizer.from_metadata(meta).apply_chat_template(
        [{"role": "user", "content": "q"}], tools=[tool]
    )
    assert out.startswith("TOOLS:search{") and out.endswith("q")


def _byte_tokens() -> list[str]:
    from tests.engine.conftest import byte_level_vocab

    return byte_level_vocab()
