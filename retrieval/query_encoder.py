"""A lean forward pass for one query through a BERT-family sentence-transformers model.

A query is one short text. Through ``SentenceTransformer`` and Hugging Face's
``BertModel`` its embedding costs ~3 ms of module and mask bookkeeping on top of the
arithmetic on a 2-core CPU; ``BertQueryEncoder`` runs the same weights as plain
functions (gpt-fast style: a ``BertArgs`` dataclass, one function per block), with no
padding, no attention mask and no pooler. Shapes: T = query tokens, D = hidden size,
H = heads, hd = head dim.

It covers what ``all-MiniLM-L6-v2`` and its family are: ``BertModel`` with absolute
positions and exact GELU, mean pooling; the vector is always normalized. For anything else
``BertQueryEncoder.from_sentence_transformer`` returns None and the caller keeps the
generic path.

Example:
    >>> encoder = BertQueryEncoder.from_sentence_transformer(model)
    >>> vector = encoder.encode("what causes scurvy?")  # (D,) float32, unit length
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


class QueryEncoder(Protocol):
    """Embeds one query text: unit-length float32 (D,)."""

    def encode(self, text: str) -> np.ndarray: ...


@dataclass
class BertArgs:
    """What the forward pass needs from the model's config."""

    n_layers: int
    n_heads: int
    dim: int
    max_seq_length: int
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class BertLayer:
    """One encoder layer's weights, Q/K/V fused into ``wqkv`` (3D, D)."""

    wqkv: Tensor
    bqkv: Tensor
    wo: Tensor
    bo: Tensor
    attention_norm: tuple[Tensor, Tensor]  # LayerNorm (weight, bias)
    w1: Tensor  # (F, D)
    b1: Tensor
    w2: Tensor  # (D, F)
    b2: Tensor
    ffn_norm: tuple[Tensor, Tensor]


def _is_mean_pooling(pooling: Any) -> bool:
    config = pooling.get_config_dict() if hasattr(pooling, "get_config_dict") else {}
    mode = config.get("pooling_mode")
    if mode is not None:
        return bool(mode == "mean")
    # older sentence-transformers: one boolean per mode
    flags = {k: v for k, v in config.items() if k.startswith("pooling_mode_") and v}
    return set(flags) == {"pooling_mode_mean_tokens"}


def bert_args(model: Any) -> BertArgs | None:
    """``model``'s sizes when the lean query encoders cover it (a CPU ``BertModel`` with
    absolute positions and exact GELU, mean pooling, optionally normalized), else None."""
    modules = [type(module).__name__ for module in model]
    if (
        not modules
        or modules[0] != "Transformer"
        or any(name not in _KNOWN_MODULES for name in modules)
    ):
        return None
    if "Pooling" not in modules or not _is_mean_pooling(model[modules.index("Pooling")]):
        return None
    bert: Any = getattr(model[0], "auto_model", None)
    config = getattr(bert, "config", None)
    if (
        type(bert).__name__ != "BertModel"
        or config is None
        or getattr(config, "position_embedding_type", "absolute") != "absolute"
        or getattr(config, "hidden_act", None) != "gelu"
        or not str(model.device).startswith("cpu")
    ):
        return None
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        return None
    return BertArgs(
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        dim=config.hidden_size,
        max_seq_length=int(model.max_seq_length or config.max_position_embeddings),
        norm_eps=config.layer_norm_eps,
    )


def token_id_function(tokenizer: Any, max_length: int) -> Callable[[str], list[int]]:
    """``text -> ids`` ([CLS] ... [SEP]) truncated to ``max_length`` like the model does.

    For a fast tokenizer this calls a private copy of its Rust backend with padding
    and truncation off (0.03 ms instead of 0.2 ms through ``__call__``), then keeps the
    first tokens and the final [SEP], as ``truncation=True`` does for one sequence. A
    copy, because the shared backend carries state: tokenizer.json files often set
    fixed padding to 128, and every ``__call__`` changes it.
    """
    own = None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        try:
            from tokenizers import Tokenizer

            own = Tokenizer.from_str(backend.to_str())
            own.no_padding()
            own.no_truncation()
        except Exception as exc:  # an optional speed-up: fall back to __call__
            logger.debug("tokenizer backend copy failed (%s); using the tokenizer", exc)
            own = None
    if own is None:

        def slow(text: str) -> list[int]:
            return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])

        return slow
    backend_copy = own

    def fast(text: str) -> list[int]:
        ids: list[int] = backend_copy.encode(text).ids
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]
        return ids

    return fast


def encoder_layer(x: Tensor, layer: BertLayer, args: BertArgs) -> Tensor:
    """Post-norm BERT layer: attention + residual, LayerNorm; GELU MLP + residual, LayerNorm."""
    D, H, hd = args.dim, args.n_heads, args.head_dim
    # -1 for T and a constant scale keep the exported ONNX graph free of shape arithmetic
    qkv = F.linear(x, layer.wqkv, layer.bqkv)  # (T, 3D)
    q, k, v = qkv.view(-1, 3, H, hd).permute(1, 2, 0, 3).unbind(0)  # (H, T, hd) each
    y = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)  # (H, T, hd): no mask
    y = y.transpose(0, 1).reshape(-1, D)  # (T, D)
    x = x + F.linear(y, layer.wo, layer.bo)
    x = F.layer_norm(x, (D,), *layer.attention_norm, args.norm_eps)
    h = F.gelu(F.linear(x, layer.w1, layer.b1))  # (T, F)
    x = x + F.linear(h, layer.w2, layer.b2)
    return F.layer_norm(x, (D,), *layer.ffn_norm, args.norm_eps)


class BertQueryEncoder:
    """Embeds one query with a BERT sentence-transformers model's weights, lean.

    Build it with ``from_sentence_transformer``; the result matches
    ``SentenceTransformer.encode`` (cosine > 0.99999 in float32).

    Args:
        args: Sizes and options.
        tokenizer: The model's Hugging Face tokenizer (truncates to ``max_seq_length``).
        embeddings: (word (V, D), position (P, D), token type 0 (D,), LayerNorm (w, b)).
        layers: The encoder layers.
    """

    def __init__(
        self,
        args: BertArgs,
        tokenizer: Any,
        embeddings: tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]],
        layers: list[BertLayer],
    ) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self._token_ids = token_id_function(tokenizer, args.max_seq_length)
        self.word_embeddings, self.position_embeddings, self.type_embedding, self.embedding_norm = (
            embeddings
        )
        self.layers = layers

    @classmethod
    def from_sentence_transformer(
        cls, model: Any, dtype: torch.dtype = torch.float32
    ) -> BertQueryEncoder | None:
        """The lean encoder for ``model``'s weights (copied to ``dtype``), or None when
        the model is not a CPU BERT with mean pooling (the caller keeps the generic path)."""
        args = bert_args(model)
        if args is None:
            return None
        bert = model[0].auto_model

        def w(tensor: Tensor) -> Tensor:
            return tensor.detach().to(dtype).contiguous()

        def norm(module: Any) -> tuple[Tensor, Tensor]:
            return (w(module.weight), w(module.bias))

        emb = bert.embeddings
        embeddings = (
            w(emb.word_embeddings.weight),
            w(emb.position_embeddings.weight),
            w(emb.token_type_embeddings.weight[0]),
            norm(emb.LayerNorm),
        )
        layers = []
        for block in bert.encoder.layer:
            qkv = (block.attention.self.query, block.attention.self.key, block.attention.self.value)
            layers.append(
                BertLayer(
                    wqkv=w(torch.cat([linear.weight for linear in qkv])),
                    bqkv=w(torch.cat([linear.bias for linear in qkv])),
                    wo=w(block.attention.output.dense.weight),
                    bo=w(block.attention.output.dense.bias),
                    attention_norm=norm(block.attention.output.LayerNorm),
                    w1=w(block.intermediate.dense.weight),
                    b1=w(block.intermediate.dense.bias),
                    w2=w(block.output.dense.weight),
                    b2=w(block.output.dense.bias),
                    ffn_norm=norm(block.output.LayerNorm),
                )
            )
        logger.debug("lean BERT query encoder: %d layers, %s", len(layers), dtype)
        return cls(args, model.tokenizer, embeddings, layers)

    def token_ids(self, text: str) -> list[int]:
        """The model's tokens for ``text`` ([CLS] ... [SEP]), truncated like the model."""
        return self._token_ids(text)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (T,) -> unit-length mean of the last hidden states, float32 (D,)."""
        T, D = ids.shape[0], self.args.dim
        x = self.word_embeddings[ids] + self.position_embeddings[:T] + self.type_embedding
        x = F.layer_norm(x, (D,), *self.embedding_norm, self.args.norm_eps)  # (T, D)
        for layer in self.layers:
            x = encoder_layer(x, layer, self.args)
        pooled = x.float().mean(dim=0)  # (D,): mean over the tokens (no padding)
        return F.normalize(pooled, p=2, dim=0)

    @torch.inference_mode()
    def encode(self, text: str) -> np.ndarray:
        """The query's sentence embedding: float32 (D,), unit length (as the retriever
        stores documents: cosine = dot product)."""
        return self.forward(torch.tensor(self.token_ids(text))).numpy()


class _ExportedEncoder(torch.nn.Module):
    """token ids (1, T) -> ``BertQueryEncoder.forward`` (1, D), for the ONNX export."""

    def __init__(self, encoder: BertQueryEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder.forward(input_ids[0])[None]


class OnnxQueryEncoder:
    """Embeds one query through ONNX Runtime: the model's transformer exported in memory.

    On an AVX2-only CPU (no native bf16) PyTorch's float32 matmuls are slow for the
    ~20 rows of a query: MiniLM took 14-16 ms per query in torch (either path) and
    6.6 ms through ONNX Runtime (the same float32 weights; cosine 1.0 to ``encode``).
    The export (~2 s) happens once, at build time, and nothing is written to disk.

    Args:
        session: An ``onnxruntime.InferenceSession`` taking ``input_ids`` (1, T).
        tokenizer: The model's tokenizer.
        max_seq_length: Tokens kept (the model's truncation).
    """

    def __init__(self, session: Any, tokenizer: Any, max_seq_length: int) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._token_ids = token_id_function(tokenizer, max_seq_length)

    @classmethod
    def from_sentence_transformer(cls, model: Any) -> OnnxQueryEncoder | None:
        """Export ``model``'s transformer (mean pooling, CPU) and open it in ONNX Runtime;
        None when the model does not fit (``bert_args``) or onnx /
        onnxruntime are missing or fail to export it."""
        import io
        import warnings

        args = bert_args(model)
        if args is None:
            return None
        try:
            import onnxruntime
        except ImportError:
            return None
        tokenizer = model.tokenizer
        buffer = io.BytesIO()
        try:
            # The lean encoder's graph, not Hugging Face's: 330 nodes instead of 713 (no mask or
            # shape arithmetic) and 0.5-1 ms faster per query on a 2-core EPYC.
            lean = BertQueryEncoder.from_sentence_transformer(model)
            assert lean is not None  # bert_args passed
            example = torch.tensor([lean.token_ids("an example")])
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python-side shapes
                torch.onnx.export(
                    _ExportedEncoder(lean).eval(),
                    (example,),
                    buffer,  # type: ignore[arg-type]  # the exporter writes to a file object too
                    input_names=["input_ids"],
                    output_names=["embedding"],
                    dynamic_axes={"input_ids": {1: "tokens"}},
                    opset_version=17,
                    dynamo=False,
                )
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only
            session = onnxruntime.InferenceSession(
                buffer.getvalue(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # export / ORT raise many types: all mean "use torch"
            logger.warning("ONNX export of the query encoder failed (%s); using torch", exc)
            return None
        return cls(session, tokenizer, args.max_seq_length)

    def token_ids(self, text: str) -> list[int]:
        """The model's tokens for ``text``, truncated like the model."""
        return self._token_ids(text)

    def encode(self, text: str) -> np.ndarray:
        """The query's unit-length embedding, float32 (D,)."""
        ids = np.asarray([self.token_ids(text)], dtype=np.int64)  # (1, T)
        (embedding,) = self.session.run(None, {"input_ids": ids})
        return np.asarray(embedding[0], dtype=np.float32)
