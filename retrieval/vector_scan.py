"""Exact nearest-neighbour search over a small collection's vectors, on the CPU.

For collections up to a few tens of thousands of chunks a full scan beats an HNSW
query and never misses a neighbour. ``VectorScan`` makes the scan cheap in memory
traffic: it first scores every row with int8 vectors (a quarter of the bytes of
float32) in ONNX Runtime, then rescores the best candidates with the float32
vectors, and proves the result exact with an error bound on the int8 scores (it
rescans in float32 when the proof fails).

Measured on a 2-core EPYC right after a query embedding, 9,715 x 384: int8 scan
0.5 ms, float32 ORT scan 1.04 ms, numpy with one BLAS thread 1.66 ms, numpy with
two 4 ms (whose spinning threads also slowed the next embedding from 7 to 11-14 ms).
The session runs on the calling thread with no spinning workers for that reason.

Shapes: N = rows, D = dimension, C = candidates rescored.

Example:
    >>> scan = VectorScan(unit_vectors)            # (N, D) float32
    >>> rows, scores = scan.top(query_vector, k=10)  # best first, exact cosine
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

_MIN_CANDIDATES = 64
_CANDIDATE_FACTOR = 4
_INT8_MAX = 63.0


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as contiguous float32."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def top_positions(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` highest scores, best first (ties keep position order)."""
    part = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    return part[np.argsort(-scores[part], kind="stable")]


class VectorScan:
    """Exact top-k by dot product against fixed float32 rows.

    Args:
        vectors: (N, D) float32 rows (unit rows give cosine similarity).
    """

    def __init__(self, vectors: np.ndarray) -> None:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
        n, dim = self.vectors.shape
        self.dim = dim
        # Symmetric per row: v ~= row_scale * v_int8, |error| <= row_scale / 2. Only 7 bits
        # (+-63): AVX2's u8 x s8 kernel adds pairs of products in int16, which saturates
        # beyond 2 * 255 * 63 (measured: errors 6x the bound with +-127).
        row_max = np.abs(self.vectors).max(axis=1)  # (N,)
        row_scale = np.where(row_max > 0, row_max / _INT8_MAX, 1.0).astype(np.float32)
        v_int8 = np.rint(self.vectors / row_scale[:, None]).astype(np.int8)  # (N, D)
        # Per-row terms of the error bound on the int8 scores (see ``approximate``).
        self._half_scale = row_scale / 2  # (N,)
        self._int8_mass = row_scale * np.abs(v_int8.astype(np.float32)).sum(axis=1)  # (N,)
        nodes = [
            # query (1, D) -> uint8 with its own scale and zero point
            helper.make_node("DynamicQuantizeLinear", ["query"], ["q8", "q_scale", "q_zero"]),
            helper.make_node("MatMulInteger", ["q8", "corpus_t", "q_zero"], ["dots"]),  # (1, N)
            helper.make_node("Cast", ["dots"], ["dots_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["dots_f", "row_scale"], ["partial"]),
            helper.make_node("Mul", ["partial", "q_scale"], ["scores"]),
        ]
        graph = helper.make_graph(
            nodes,
            "vector_scan",
            [helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, dim])],
            [
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, n]),
                helper.make_tensor_value_info("q_scale", TensorProto.FLOAT, []),
            ],
            [
                numpy_helper.from_array(np.ascontiguousarray(v_int8.T), "corpus_t"),  # (D, N)
                numpy_helper.from_array(row_scale, "row_scale"),  # (N,)
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def approximate(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int8 scores of every row (N,) and, per row, a bound on their error (N,).

        With ``v ~= s * v8`` (error <= s / 2 per component) and ``q ~= q_scale * (q8 - z)``
        (error <= q_scale, the rounded zero point included):
        ``|q.v - approx| <= |q|_1 * s / 2 + q_scale * s * |v8|_1``.
        """
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        scores, q_scale = self._session.run(None, {"query": query})
        slack = float(np.abs(query).sum()) * self._half_scale + float(q_scale) * self._int8_mass
        return np.asarray(scores[0]), slack * 1.001 + 1e-5  # margin for float32 rounding

    def top(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows with the highest dot product with ``query``, best first.

        Args:
            query: (D,) float32.
            k: Rows wanted (fewer when fewer are allowed).
            allowed: Optional (N,) bool mask of the rows that may be returned.

        Returns:
            Row positions (k,) and their exact float32 scores (k,).
        """
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        approx, slack = self.approximate(query)  # (N,), (N,)
        pool = np.arange(len(approx)) if allowed is None else np.flatnonzero(allowed)
        if allowed is not None:
            approx, slack = approx[pool], slack[pool]
        k = min(k, len(pool))
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        n_cand = min(len(pool), max(_CANDIDATE_FACTOR * k, _MIN_CANDIDATES))
        order = top_positions(approx, n_cand)  # (C,) into pool
        rows = pool[order]
        exact = self.vectors[rows] @ query  # (C,)
        best = top_positions(exact, k)
        if n_cand < len(pool):
            # A row left out scores at most its approximation + slack; the k-th kept
            # row must beat all of them, or the answer may be inexact.
            upper = approx + slack
            upper[order] = -np.inf
            if float(exact[best[-1]]) < float(upper.max()):
                logger.debug("int8 candidates not provably exact; rescanning in float32")
                exact = (self.vectors if allowed is None else self.vectors[pool]) @ query
                best = top_positions(exact, k)
                return pool[best], exact[best]
        return rows[best], exact[best]
