"""VectorScan: int8 candidates, float32 rescoring, and the proof that the top k is exact."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from retrieval.vector_scan import VectorScan, unit_rows


def _clustered(n: int, d: int = 384, seed: int = 0) -> np.ndarray:
    """Unit vectors in a few tight clusters (like real embeddings: many near-ties)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    rows = centres[rng.integers(0, 8, n)] + 0.35 * rng.standard_normal((n, d))
    return unit_rows(rows.astype(np.float32))


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(6000)


@pytest.fixture(scope="module")
def scan(vectors: np.ndarray) -> VectorScan:
    return VectorScan(vectors)


def _queries(vectors: np.ndarray, n: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    near_rows = vectors[rng.integers(0, len(vectors), n // 2)]
    noisy = unit_rows(near_rows + 0.2 * rng.standard_normal(near_rows.shape).astype(np.float32))
    random = unit_rows(rng.standard_normal((n - n // 2, vectors.shape[1])).astype(np.float32))
    return list(noisy) + list(random)


def test_int8_error_stays_within_the_bound(scan: VectorScan, vectors: np.ndarray) -> None:
    # The bound is what makes the top k provably exact; it failed (6x over) when the
    # weights used the full int8 range, because AVX2's u8 x s8 kernel saturates.
    for query in _queries(vectors):
        approx, slack = scan.approximate(query)
        error = np.abs(approx - vectors @ query)
        assert (error <= slack).all(), float((error - slack).max())
        assert error.max() > 0  # it really is an approximation


@pytest.mark.parametrize("k", [1, 10, 100, 6000, 7000])
def test_top_k_equals_brute_force(scan: VectorScan, vectors: np.ndarray, k: int) -> None:
    for query in _queries(vectors):
        rows, scores = scan.top(query, k)
        want_rows, want_scores = _brute_force(vectors, query, k)
        # the same rows with the same scores; order may differ only between float ties
        assert sorted(rows.tolist()) == sorted(want_rows.tolist())
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        np.testing.assert_allclose(vectors[rows] @ query, scores, atol=1e-5)
        if k <= 100:
            assert rows.tolist() == want_rows.tolist()


def test_allowed_mask_is_applied_before_ranking(scan: VectorScan, vectors: np.ndarray) -> None:
    allowed = np.zeros(len(vectors), dtype=bool)
    allowed[::7] = True
    for query in _queries(vectors, 4):
        rows, _ = scan.top(query, 20, allowed)
        keep = np.flatnonzero(allowed)
        order = np.argsort(-(vectors[keep] @ query), kind="stable")[:20]
        assert rows.tolist() == keep[order].tolist()
    rows, scores = scan.top(vectors[0], 5, np.zeros(len(vectors), dtype=bool))
    assert len(rows) == 0 and len(scores) == 0


def test_near_ties_fall_back_to_a_float32_scan(caplog: pytest.LogCaptureFixture) -> None:
    # Rows that differ by less than the int8 step cannot be ordered from int8 scores:
    # the proof fails and the answer comes from a full float32 scan, still exact.
    rng = np.random.default_rng(3)
    base = rng.standard_normal(64).astype(np.float32)
    rows = unit_rows(base + 0.05 * rng.standard_normal((500, 64)).astype(np.float32))
    scan = VectorScan(rows)
    query = unit_rows(base[None])[0]
    with caplog.at_level(logging.DEBUG, logger="retrieval.vector_scan"):
        got, scores = scan.top(query, 3)
    assert "rescanning in float32" in caplog.text
    want, want_scores = _brute_force(rows, query, 3)
    assert got.tolist() == want.tolist()
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
