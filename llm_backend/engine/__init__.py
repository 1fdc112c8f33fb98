"""ragloom's in-house inference engine: GGUF -> PyTorch Llama/Qwen2 -> int8/int4 -> KV cache.

Public surface (the scheduler and server build on these):

- ``load_model(path, quant=..., max_batch=..., max_seq_len=...) -> LoadedModel``
- ``Transformer.forward(tokens, input_pos, slots, last_only=..., kv_len=...)``,
  ``Transformer.fill_cache``, ``Transformer.setup_caches``, ``Transformer.copy_slot_prefix``
- ``prefill``, ``decode_one_token``, ``generate``
- ``SamplingParams``, ``BatchSamplingTensors``, ``make_generators``, ``sample``,
  ``top_logprobs``; ``quantize_model``
- ``EngineTokenizer``, ``IncrementalDecoder``
- ``pull_model``, ``list_models``, ``resolve_model``
- ``EngineError``, ``ModelFileError``
"""

from llm_backend.engine.errors import EngineError, ModelFileError
from llm_backend.engine.generate import decode_one_token, generate, prefill
from llm_backend.engine.loader import QUANT_MODES, LoadedModel, load_model
from llm_backend.engine.model import ModelArgs, Transformer
from llm_backend.engine.quantize import quantize_model
from llm_backend.engine.registry import ModelInfo, list_models, pull_model, resolve_model
from llm_backend.engine.sampling import (
    BatchSamplingTensors,
    SamplingParams,
    make_generators,
    sample,
    top_logprobs,
)
from llm_backend.engine.tokenizer import EngineTokenizer, IncrementalDecoder, TemplateError

__all__ = [
    "QUANT_MODES",
    "BatchSamplingTensors",
    "EngineError",
    "EngineTokenizer",
    "IncrementalDecoder",
    "LoadedModel",
    "ModelArgs",
    "ModelFileError",
    "ModelInfo",
    "SamplingParams",
    "TemplateError",
    "Transformer",
    "decode_one_token",
    "generate",
    "list_models",
    "load_model",
    "make_generators",
    "prefill",
    "pull_model",
    "quantize_model",
    "resolve_model",
    "sample",
    "top_logprobs",
]
