"""Tiny random GGUFs (written with gguf.GGUFWriter) against transformers loading the same file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_backend.engine.gguf_reader import GGUFFile
from llm_backend.engine.loader import load_model
from llm_backend.engine.model import (
    KEY_ALIGN,
    PREFILL_QUERY_BLOCK,
    SMALL_T_ATTENTION,
    Attention,
    ModelArgs,
    Transformer,
    lazy_zeros,
    release_pages,
)
from llm_backend.engine.quantize import Int8Embedding, Int8Linear
from tests.engine.conftest import load_hf_from_gguf

TOKENS = [5, 6, 7, 100, 200, 3, 9, 42, 17, 250]
CASES = {
    "llama-gqa-separate-output": {},
    "qwen2-qkv-bias": {"arch": "qwen2", "qkv_bias": True},
    "llama-tied": {"tied": True},
    "llama-f16": {"tensor_type": "F16"},
    "llama-q8_0": {"tensor_type": "Q8_0"},
    "llama-no-gqa": {"n_kv_heads": 4},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_matches_transformers_prefill_and_decode(
    case: str, tiny_gguf: Callable[..., Path]
) -> None:
    path = tiny_gguf(**CASES[case])
    hf = load_hf_from_gguf(path)
    loaded = load_model(path, quant="fp32", max_batch=2, max_seq_len=64)
    model = loaded.model
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        reference = hf(ids).logits  # (1, T, V)
        prompt_len = 6
        prefill_logits = model(
            ids[:, :prompt_len],
            torch.arange(prompt_len)[None],
            torch.tensor([1]),
            kv_len=prompt_len,
        )
        decoded = [
            model(ids[:, t : t + 1], torch.tensor([[t]]), torch.tensor([1]), kv_len=t + 1)
            for t in range(prompt_len, len(TOKENS))
        ]
    ours = torch.cat([prefill_logits, *decoded], dim=1)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_tiny_tied_shares_one_weight(tiny_gguf: Callable[..., Path]) -> None:
    loaded = load_model(tiny_gguf(tied=True), quant="fp32", max_batch=1, max_seq_len=16)
    assert loaded.args.tied_embeddings
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_models_look_tokens_up_in_int8_rows(
    tiny_gguf: Callable[..., Path], tied: bool, quant: str
) -> None:
    """The float vocab matrix is not kept: lookups read int8 rows (tied: the output
    projection's own matrix, held once), within int8 rounding of the file's rows."""
    path = tiny_gguf(tied=tied)
    model = load_model(path, quant=quant, max_batch=1, max_seq_len=16).model
    embedding, output = model.tok_embeddings, model.output
    assert isinstance(embedding, Int8Embedding) and isinstance(output, Int8Linear)
    assert (embedding.weight is output.weight) == tied
    assert not any(t.is_floating_point() and t.numel() >= embedding.weight.numel()
                   for t in model.state_dict().values())  # fmt: skip
    tokens = torch.tensor([[0, 3, 7, 7]])
    rows = GGUFFile.open(path).tensor("token_embd.weight")[tokens[0]]  # (4, D)
    step = rows.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per row
    looked_up = embedding(tokens)[0]
    assert looked_up.dtype == torch.float32
    assert ((looked_up - rows).abs() <= step / 2 + 1e-6).all()


def test_rows_at_different_positions_in_one_step(tiny_gguf: Callable[..., Path]) -> None:
    """Two requests in different slots decode together while at different positions."""
    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=4, max_seq_len=64)
    model = loaded.model
    a, b = TOKENS[:7], TOKENS[2:5]
    with torch.no_grad():
        # Alone: each in its own slot, its last token decoded separately.
        model(torch.tensor([a[:-1]]), torch.arange(6)[None], torch.tensor([3]), kv_len=6)
        alone_a = model(torch.tensor([[a[-1]]]), torch.tensor([[6]]), torch.tensor([3]))
        model(torch.tensor([b[:-1]]), torch.arange(2)[None], torch.tensor([0]), kv_len=2)
        alone_b = model(torch.tensor([[b[-1]]]), torch.tensor([[2]]), torch.tensor([0]))
        # Together: one (2, 1) step, rows at positions 6 and 2, slots 2 and 1 (re-prefilled).
        model(torch.tensor([a[:-1]]), torch.arange(6)[None], torch.tensor([2]), kv_len=6)
        model(torch.tensor([b[:-1]]), torch.arange(2)[None], torch.tensor([1]), kv_len=2)
        both = model(
            torch.tensor([[a[-1]], [b[-1]]]),
            torch.tensor([[6], [2]]),
            torch.tensor([2, 1]),
            kv_len=7,
        )
    torch.testing.assert_close(both[0], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_b[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # rows in consecutive slots 1, 2 read cache views: same logits
        views = model(
            torch.tensor([[b[-1]], [a[-1]]]),
            torch.tensor([[2], [6]]),
            torch.tensor([1, 2]),
            kv_len=7,
            first_slot=1,
        )
    torch.testing.assert_close(views[0], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(views[1], alone_a[0], atol=1e-5, rtol=1e-5)


def test_copy_slot_prefix_reuses_cached_prompt(tiny_gguf: Callable[..., Path]) -> None:
    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=3, max_seq_len=32)
    model = loaded.model
    ids = torch.tensor([TOKENS[:8]])
    with torch.no_grad():
        full = model(ids, torch.arange(8)[None], torch.tensor([0]), kv_len=8)
        model.copy_slot_prefix(0, 2, 5)  # slot 2 now holds positions 0..4
        rest = model(ids[:, 5:], torch.arange(5, 8)[None], torch.tensor([2]), kv_len=8)
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_last_only_and_logits_index(tiny_gguf: Callable[..., Path]) -> None:
    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=2, max_seq_len=32)
    model = loaded.model
    ids = torch.tensor([TOKENS[:6], TOKENS[1:7]])
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        full = model(ids, pos, torch.tensor([0, 1]), kv_len=6)
        last = model(ids, pos, torch.tensor([0, 1]), last_only=True, kv_len=6)
        picked = model(ids, pos, None, last_only=True, logits_index=torch.tensor([2, 4]), kv_len=6)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(picked[:, 0], torch.stack((full[0, 2], full[1, 4])))


@pytest.mark.parametrize("prompt_len", [7, 3])  # a prefill forward; a few-token step
def test_fill_cache_writes_what_forward_writes(
    tiny_gguf: Callable[..., Path], prompt_len: int
) -> None:
    """``fill_cache`` (a prefill whose logits nobody samples) leaves the cache as
    ``forward`` does, and the next token's logits are the same. A prefill forward's
    last layer stops at its cache write: its feed-forward never runs."""
    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=2, max_seq_len=32)
    model = loaded.model
    last_ffn_calls: list[int] = []
    model.blocks()[-1].feed_forward.register_forward_hook(lambda *_: last_ffn_calls.append(1))
    ids = torch.tensor([TOKENS[:prompt_len]])
    pos = torch.arange(prompt_len)[None]
    step = (torch.tensor([[TOKENS[prompt_len]]]), torch.tensor([[prompt_len]]))
    with torch.no_grad():
        model(ids, pos, torch.tensor([0]), kv_len=prompt_len)
        want = model(*step, torch.tensor([0]), kv_len=prompt_len + 1)
        last_ffn_calls.clear()
        model.fill_cache(ids, pos, torch.tensor([1]), kv_len=prompt_len)
        assert len(last_ffn_calls) == (1 if prompt_len <= SMALL_T_ATTENTION else 0)
        got = model(*step, torch.tensor([1]), kv_len=prompt_len + 1)
    for block in model.blocks():
        cache = block.attention.kv_cache
        assert cache is not None
        assert torch.equal(cache.k_cache[0], cache.k_cache[1])
        assert torch.equal(cache.v_cache[0], cache.v_cache[1])
    assert torch.equal(got, want)


def test_forward_without_setup_caches_is_a_clear_error(tiny_gguf: Callable[..., Path]) -> None:
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.gguf_reader import GGUFFile
    from llm_backend.engine.loader import build_model

    model = build_model(GGUFFile.open(tiny_gguf()))
    with pytest.raises(EngineError, match="setup_caches"):
        model(torch.tensor([[1, 2]]), torch.arange(2)[None])


def test_generate_rejects_what_does_not_fit(tiny_gguf: Callable[..., Path]) -> None:
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.generate import generate
    from llm_backend.engine.sampling import SamplingParams

    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=2, max_seq_len=16)
    model, tokenizer = loaded.model, loaded.tokenizer
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(EngineError, match="batch of 3 rows does not fit 2 cache slots"):
        generate(model, tokenizer, [[1], [2], [3]], [greedy] * 3)
    with pytest.raises(
        EngineError, match=r"prompt 0 has 14 tokens \+ max_tokens 4 > cache length 16"
    ):
        generate(model, tokenizer, [[5] * 14], [greedy])
    with pytest.raises(EngineError, match="prompt 1 is empty"):
        generate(model, tokenizer, [[5], []], [greedy] * 2)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1\.5"):
        generate(model, tokenizer, [[5]], [SamplingParams(top_p=1.5)])
    # Rows with different max_tokens stop on their own.
    outs = generate(
        model,
        tokenizer,
        [[5, 6, 7], [9]],
        [
            SamplingParams(temperature=0.0, max_tokens=2, stop_token_ids=[]),
            SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[]),
        ],
    )
    [longer] = generate(
        model, tokenizer, [[5, 6, 7]], [SamplingParams(temperature=0.0, max_tokens=9)]
    )
    assert outs[0] == longer[:2]  # greedy: the short row is a prefix of the long run
    assert len(outs[1]) <= 9


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_kv_cache_pages_become_resident_only_where_written() -> None:
    # 32 slots x 3 heads x 2,048 positions x 64 dims float32 = 48 MiB per buffer.
    cache, mapping = lazy_zeros((32, 3, 2048, 64), torch.float32)
    assert float(cache.abs().sum()) == 0.0  # zero everywhere, read without a fill
    before = _resident_mib()
    cache[:, :, :16] = 1.0  # 16 positions in every slot: 4 KiB pages, not 2 MiB ones
    grown = _resident_mib() - before
    assert grown < 8, f"writing 0.4 MiB made {grown:.1f} MiB resident"
    assert float(cache.sum()) == 32 * 3 * 16 * 64
    cache[:4] = 2.0  # 6 MiB resident
    written = _resident_mib()
    release_pages(mapping)
    assert written - _resident_mib() > 5  # handed back ...
    assert float(cache.abs().sum()) == 0.0  # ... and zero again


def test_release_cache_memory_forgets_cached_keys(tiny_gguf: Callable[..., Path]) -> None:
    loaded = load_model(tiny_gguf(), quant="fp32", max_batch=2, max_seq_len=16)
    model = loaded.model
    ids = torch.arange(1, 9)[None]
    with torch.inference_mode():
        first = model(ids, torch.arange(8)[None], torch.tensor([1]), kv_len=8)
        cache = model.layers[0].attention.kv_cache
        assert cache is not None and float(cache.k_cache[1].abs().sum()) > 0
        model.release_cache_memory()
        assert float(cache.k_cache.abs().sum()) == 0 and float(cache.v_cache.abs().sum()) == 0
        again = model(ids, torch.arange(8)[None], torch.tensor([1]), kv_len=8)  # still usable
    torch.testing.assert_close(again, first)


def test_prefill_key_bounds_per_query_block() -> None:
    # Two rows as the scheduler batches them: one 130 tokens into its prompt, one new.
    T = 200
    positions = torch.stack((torch.arange(130, 130 + T), torch.arange(T)))  # (2, T)
    bounds = Transformer.prefill_key_bounds(positions, S=330)
    assert PREFILL_QUERY_BLOCK == 128
    # block 0 (t < 128): every row sees key 0, none sees past 130 + 127 (258, rounded
    # up to whole KEY_ALIGN blocks: 288); block 1: every row sees keys <= 128,
    # none past 130 + 199 (330, or S)
    assert KEY_ALIGN == 32
    assert bounds == ((1, 288), (129, 330))
    assert Transformer.prefill_key_bounds(positions, S=300)[1] == (129, 300)


@pytest.mark.parametrize("align", [KEY_ALIGN, 1])
def test_blocked_prefill_of_a_prompt_is_the_same_alone_and_beside_a_longer_one(
    align: int, tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler pads a prompt prefilled beside a longer one: its rows attend to
    more (masked) keys. With whole key blocks the result is the same bit for bit as
    alone, so a greedy answer does not depend on its neighbours; unaligned (align 1,
    PyTorch's bf16 softmax summing a row's tail apart) it drifted."""
    import llm_backend.engine.model as model_module

    monkeypatch.setattr(model_module, "KEY_ALIGN", align)
    path = tiny_gguf(dim=256, n_heads=16, n_kv_heads=4, n_layers=4)  # enough rows to drift
    model = load_model(path, quant="bf16", max_batch=2, max_seq_len=256).model
    model._blocked_prefill = True  # as on a CPU with native bf16
    ids = torch.randint(0, 256, (2, 228), generator=torch.Generator().manual_seed(6))
    n = 174
    with torch.no_grad():
        alone = model(ids[:1, :n], torch.arange(n)[None], torch.tensor([0]), kv_len=n)
        padded = torch.stack((torch.cat((ids[0, :n], ids[0, : 228 - n])), ids[1]))  # (2, 228)
        positions = torch.arange(228)[None].repeat(2, 1)
        beside = model(padded, positions, torch.tensor([0, 1]), kv_len=228)
    same = torch.equal(alone[0], beside[0, :n])
    assert same == (align == KEY_ALIGN)


def test_blocked_prefill_attention_matches_the_float32_model(
    tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 prefill on a CPU runs attention a query block at a time against the keys
    each block can see; batched rows at different prompt offsets and a chunk that
    attends to a cached prefix give the float32 model's logits to bf16 accuracy, as
    close as SDPA's."""
    path = tiny_gguf(n_kv_heads=2, n_heads=4)
    reference = load_model(path, quant="fp32", max_batch=2, max_seq_len=512).model
    model = load_model(path, quant="bf16", max_batch=2, max_seq_len=512).model
    blocked_calls = []
    original = Attention._blocked_attention

    def spy(self: Attention, *args: Any) -> torch.Tensor:
        blocked_calls.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(Attention, "_blocked_attention", spy)
    ids = torch.randint(0, 256, (2, 250), generator=torch.Generator().manual_seed(0))

    def run(m: Transformer) -> torch.Tensor:
        with torch.no_grad():
            # row 0 prefills 60 tokens alone, then rows 0 and 1 go together (the
            # model's context is 256): row 0 continues at 60 over its cached prefix,
            # row 1 starts at 0
            m(ids[:1, :60], torch.arange(60)[None], torch.tensor([0]), kv_len=60)
            positions = torch.stack((torch.arange(60, 250), torch.arange(190)))
            tokens = torch.stack((ids[0, 60:250], ids[1, :190]))
            return m(tokens, positions, torch.tensor([0, 1]), kv_len=250, first_slot=0)

    expected = run(reference)
    scale = expected.abs().max()
    errors = {}
    for blocked in (False, True):
        model._blocked_prefill = blocked
        blocked_calls.clear()
        errors[blocked] = ((run(model) - expected).abs().max() / scale).item()
        assert bool(blocked_calls) == blocked
    # 2 query blocks over whole key blocks; kv_len 250 -> 255 (256 is the whole cache,
    # which forward keeps for a kv_len that needs it)
    assert blocked_calls[-1] == ((1, 192), (129, 255))
    assert errors[True] < 0.02, errors
    assert errors[True] < 2 * errors[False] + 0.005, errors


def test_decode_attention_forms_match_the_float32_model(
    tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step's attention forms (eager float32, eager bf16 over a bf16 cache read
    as it is, the fused form compiled steps use, and ragloom's C++ kernel where the CPU
    runs it) give the float32 model's logits: rows at different lengths, one slot
    holding stale keys past its row's position from an earlier, longer prompt (a form
    that attends past a row's position sees them)."""
    import llm_backend.engine.model as model_module

    path = tiny_gguf(n_kv_heads=2, n_heads=4)
    reference = load_model(path, quant="fp32", max_batch=2, max_seq_len=128).model
    model = load_model(path, quant="bf16", max_batch=2, max_seq_len=128).model
    ids = torch.randint(0, 256, (3, 90), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([0, 1])

    def step(m: Transformer, form: str) -> torch.Tensor:
        with torch.no_grad():
            m(ids[:1, :80], torch.arange(80)[None], torch.tensor([0]), kv_len=80)
            m(ids[1:2, :90], torch.arange(90)[None], torch.tensor([1]), kv_len=90)
            m(ids[2:3, :30], torch.arange(30)[None], torch.tensor([1]), kv_len=30)  # stale 30..89
            tokens, positions = torch.tensor([[7], [9]]), torch.tensor([[80], [30]])
            if form == "fused":  # as a compiled step runs it, here eagerly
                return m._run(tokens, positions, slots[:, None], None, 81, compiled=True)
            return m(tokens, positions, slots, kv_len=81, first_slot=0)

    expected = step(reference, "float32")
    scale = expected.abs().max()
    errors = {}
    if model._attention_kernel:  # head_dim 16, a bf16 cache, AVX512-BF16
        assert model.decode_attention(2, 81, compiled=False) == "kernel"
        errors["kernel"] = ((step(model, "kernel") - expected).abs().max() / scale).item()
        assert errors["kernel"] < 0.02, errors
        model._attention_kernel = False
    for form, threshold in (("float32", 10**9), ("bf16", 0), ("fused", 10**9)):
        monkeypatch.setattr(model_module, "BF16_DECODE_MIN_POSITIONS", threshold)
        assert form == "fused" or model.decode_attention(2, 81, compiled=False) == form
        errors[form] = ((step(model, form) - expected).abs().max() / scale).item()
    assert errors["float32"] < 0.02 and errors["fused"] < 0.02, errors
    assert errors["bf16"] < 2 * errors["float32"] + 0.005, errors
    # the fp32 model's fused form is the float32 form up to summation order
    fused = step(reference, "fused")
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_decode_attention_form_by_size_and_cache() -> None:
    """bf16 only from BF16_DECODE_MIN_POSITIONS positions and over a bf16 cache on a
    CPU with native bf16; compiled steps always fused."""
    import llm_backend.engine.model as model_module
    from llm_backend.engine.quantize import cpu_has_native_bf16

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64)
    model = Transformer(args).to(torch.bfloat16)
    model.setup_caches(2, 64, torch.bfloat16)
    many = model_module.BF16_DECODE_MIN_POSITIONS
    assert model.decode_attention(1, many - 1, compiled=False) == "float32"
    expected = "bf16" if cpu_has_native_bf16() else "float32"
    assert model.decode_attention(4, many // 4, compiled=False) == expected
    assert model.decode_attention(1, 10, compiled=True) == "fused"
    model.setup_caches(2, 64, torch.float32)
    assert model.decode_attention(4, many, compiled=False) == "float32"


@pytest.mark.parametrize("quant", ["int8", "int4", "bf16"])
def test_logits_tied_in_bf16_are_told_apart_in_float32(
    quant: str, tiny_gguf: Callable[..., Path]
) -> None:
    """A quantized or bf16 output projection rounds logits to bf16, so close candidates
    tie at the top; the one with the larger float32 logit wins (not the lower token
    id), and logits without a tie at the top come back unchanged. A float32 model's
    logits are left alone."""
    model = load_model(tiny_gguf(), quant=quant, max_batch=1, max_seq_len=32).model
    output = model.output
    h = torch.randn(4, 6, model.args.dim, generator=torch.Generator().manual_seed(4))
    h = h.to(torch.bfloat16)
    with torch.no_grad():
        rounded = output(h).float()  # (4, 6, V)
        weight = output.weight.float()
        if isinstance(output, Int8Linear):
            weight = weight * output.scales.float()[:, None]
        exact = h.float() @ weight.T  # (4, 6, V)
        top2 = rounded.topk(2, dim=-1)  # (4, 6, 2)
        untied = top2.values[..., 0] != top2.values[..., 1]  # (4, 6): ties happen by themselves
        assert untied.any()
        assert torch.equal(model.break_logit_ties(rounded, h)[untied], rounded[untied])
        tied = rounded.clone()
        second = top2.indices[..., 1:]  # (4, 6, 1)
        tied.scatter_(-1, second, rounded.amax(dim=-1, keepdim=True))  # a tie everywhere
        broken = model.break_logit_ties(tied, h)
    first = rounded.argmax(dim=-1, keepdim=True)
    pair = torch.cat((first, second), dim=-1)  # (4, 6, 2)
    expected = pair.gather(-1, exact.gather(-1, pair).argmax(dim=-1, keepdim=True))
    assert torch.equal(broken.argmax(dim=-1, keepdim=True), expected)
    assert (expected == pair.amax(dim=-1, keepdim=True)).any()  # not the lower id each time
    assert (broken != tied).sum() == 4 * 6  # one logit raised per position
    assert torch.all((broken - tied).abs() < 1e-5)
    fp32 = load_model(tiny_gguf(), quant="fp32", max_batch=1, max_seq_len=32).model
    logits = torch.randn(1, 1, model.args.vocab_size)
    assert fp32.break_logit_ties(logits, h[:1, :1].float()) is logits
