"""Serving benchmark: our engine (through the scheduler) beside transformers, llama.cpp, vLLM.

Same GGUF (SmolLM2-135M-Instruct Q4_1), one run, each engine in its own subprocess (so
peak RSS is its own). Figures: prefill tok/s (512-token prompt), decode tok/s at batch
1, aggregate decode tok/s with 8 and 32 concurrent requests, TTFT of a 1,500-token
prompt, peak RSS; without a target: start-up time (``load_s``) and ``long_8_tok_s``,
the aggregate decode rate of 8 requests over 1,500-token prompts whose keys are
already cached (RAG-sized contexts, where reading the cache dominates a decode step:
each request is sent once for one token, then again; peak RSS is read before this
phase). Ours is measured as it
serves: requests go through an ``AsyncEngine`` (its own engine thread) and are consumed
by asyncio, as in ``ragloom engine serve`` and the API. Targets are printed
beside, plus our batch-1 ratio to the int8 bandwidth bound (205 tok/s on this machine
kind).

Peers: transformers loads the GGUF in fp32; llama-cpp-python runs only if
``.venv-llamacpp`` exists (``use_extra_bufts=False``, else it segfaults on AMX); vLLM
only with ``--vllm-url http://127.0.0.1:PORT/v1`` (a running vLLM-CPU server).

The machine is shared: the load average is printed; treat figures under load as noisy.

Usage:
    .venv/bin/python benchmarks/engine.py
        [--engines ours-int8,ours-int4,ours-fp16,ours-int4-compiled,ours-fp16-compiled,hf,
                   llamacpp]
        [--decode-tokens 64] [--vllm-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "prefill_tok_s": (">=", 3000.0),
    "decode_b1_tok_s": (">=", 100.0),
    "agg_8_tok_s": (">=", 250.0),
    "agg_32_tok_s": (">=", 400.0),
    "ttft_1500_s": ("<=", 0.6),
    "peak_rss_mib": ("<=", 600.0),
}
BANDWIDTH_BOUND_TOK_S = 205.0
TEXT = REPO.parent / "shared/data/docs-samples/rst/json.rst.txt"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompt_ids(encode: Any, n_tokens: int, salt: int = 0) -> list[int]:
    text = TEXT.read_text(encoding="utf-8") if TEXT.exists() else "The quick brown fox. " * 500
    ids = list(encode(f"Document {salt}.\n" + text))
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


def _model_path() -> Path:
    if os.environ.get("RAGLOOM_BENCH_MODEL"):  # resolved by the parent (workers without torch)
        return Path(os.environ["RAGLOOM_BENCH_MODEL"])
    from llm_backend.engine.registry import pull_model

    cache = Path(os.environ.get("RAGLOOM_MODELS_DIR", "~/.cache/ragloom/models")).expanduser()
    return pull_model("smollm2-135m", cache)


# ---------------------------------------------------------------------- ours
def bench_ours(variant: str, decode_tokens: int) -> dict[str, float]:
    from llm_backend.engine.async_engine import AsyncEngine
    from llm_backend.engine.loader import load_model
    from llm_backend.engine.sampling import SamplingParams
    from llm_backend.engine.scheduler import SchedulerConfig

    # "int4" or "int4-compiled": the weights, and whether decode runs through torch.compile
    quant, _, mode = variant.partition("-")
    load_started = time.perf_counter()
    loaded = load_model(
        _model_path(),
        quant=quant,
        max_batch=32,
        max_seq_len=2048,
        compile_decode=mode == "compiled",
    )
    load_s = time.perf_counter() - load_started
    tok = loaded.tokenizer

    def serve(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
        """Serve ``prompts`` at once through ``engine`` (the engine thread, as the servers
        run it), consumed by asyncio in this thread."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

        async def one(prompt: list[int]) -> tuple[float, int]:
            first, tokens = 0.0, 0
            async for output in engine.generate(prompt, params, ignore_eos=True):
                if not first and output.token_ids:
                    first = time.perf_counter()
                tokens += len(output.token_ids)
            return first, tokens

        async def serve_all() -> list[tuple[float, int]]:
            return await asyncio.gather(*(one(prompt) for prompt in prompts))

        start = time.perf_counter()
        results = asyncio.run(serve_all())
        end = time.perf_counter()
        first = min(when for when, _ in results)
        return {
            "ttft": first - start,
            "total": end - start,
            "tokens": float(sum(tokens for _, tokens in results)),
            "after_first": end - first,
        }

    def run(prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
        """``serve`` on an engine of its own, with no prefix-cache hits between phases."""
        engine = AsyncEngine(
            loaded,
            model_name="bench",
            config=SchedulerConfig(max_running=32, prefill_chunk=512, min_prefix=10**6),
        ).start()
        try:
            return serve(engine, prompts, max_tokens)
        finally:
            engine.stop()

    run([_prompt_ids(tok.encode, 64)], 4)  # warm-up
    prefill = run([_prompt_ids(tok.encode, 512, 1)], 1)
    decode = run([_prompt_ids(tok.encode, 32, 2)], decode_tokens)
    agg8 = run([_prompt_ids(tok.encode, 32, 10 + i) for i in range(8)], decode_tokens)
    agg32 = run([_prompt_ids(tok.encode, 32, 50 + i) for i in range(32)], decode_tokens)
    ttft = run([_prompt_ids(tok.encode, 1500, 3)], 1)
    peak_rss = _peak_rss_mib()  # before the long prompts' cache (8 x 1,500 positions)

    # 8 long prompts prefilled once (max_tokens 1), then decoded again from their cache
    engine = AsyncEngine(
        loaded, model_name="bench", config=SchedulerConfig(max_running=32, prefill_chunk=512)
    ).start()
    long_prompts = [_prompt_ids(tok.encode, 1500, 100 + i) for i in range(8)]
    try:
        serve(engine, long_prompts, 1)
        long = serve(engine, long_prompts, decode_tokens)
    finally:
        engine.stop()
    return {
        "prefill_tok_s": 512 / prefill["ttft"],
        "decode_b1_tok_s": (decode["tokens"] - 1) / decode["after_first"],
        "agg_8_tok_s": agg8["tokens"] / agg8["total"],
        "agg_32_tok_s": agg32["tokens"] / agg32["total"],
        "ttft_1500_s": ttft["ttft"],
        "peak_rss_mib": peak_rss,
        "load_s": load_s,
        "long_8_tok_s": long["tokens"] / long["total"],
    }


# ---------------------------------------------------------------------- transformers
def bench_hf(decode_tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path()
    load_started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_s = time.perf_counter() - load_started
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def forward_time(n: int) -> float:
        ids = torch.tensor([_prompt_ids(encode, n, n)])
        start = time.perf_counter()
        model(ids)
        return time.perf_counter() - start

    def greedy_s(ids: torch.Tensor, new_tokens: int) -> float:
        """Seconds for ``new_tokens`` greedy tokens after each row of ``ids``."""
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return time.perf_counter() - start

    def generate(batch: int) -> float:
        ids = torch.tensor([_prompt_ids(encode, 32, 10 + i) for i in range(batch)])
        return decode_tokens * batch / greedy_s(ids, decode_tokens)

    def long_decode() -> float:
        """8 x 1,500-token prompts: the decode rate once they are in the cache (the
        time of 64 new tokens less that of 1)."""
        ids = torch.tensor([_prompt_ids(encode, 1500, 100 + i) for i in range(8)])
        return 8 * (decode_tokens - 1) / (greedy_s(ids, decode_tokens) - greedy_s(ids, 1))

    with torch.inference_mode():
        forward_time(64)
        prefill = 512 / forward_time(512)
        b1 = generate(1)
        agg8 = generate(8)
        agg32 = generate(32)
        ttft = forward_time(1500)
        peak_rss = _peak_rss_mib()  # before the long prompts' cache
        long8 = long_decode()
    return {
        "prefill_tok_s": prefill,
        "decode_b1_tok_s": b1,
        "agg_8_tok_s": agg8,
        "agg_32_tok_s": agg32,
        "ttft_1500_s": ttft,
        "peak_rss_mib": peak_rss,
        "load_s": load_s,
        "long_8_tok_s": long8,
    }


# ---------------------------------------------------------------------- llama.cpp
def bench_llamacpp(decode_tokens: int) -> dict[str, float]:
    from llama_cpp import Llama  # only inside .venv-llamacpp

    load_started = time.perf_counter()
    llm = Llama(str(_model_path()), n_ctx=2048, n_threads=2, verbose=False, use_extra_bufts=False)
    load_s = time.perf_counter() - load_started

    def tokens(n: int, salt: int) -> list[int]:
        return _prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), n, salt)

    def eval_time(n: int, salt: int) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens(n, salt))
        return time.perf_counter() - start

    eval_time(64, 0)
    prefill = 512 / eval_time(512, 1)
    llm.reset()
    llm.eval(tokens(32, 2))
    start = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([llm.sample(temp=0.0)])
    b1 = decode_tokens / (time.perf_counter() - start)
    ttft = eval_time(1500, 3)
    nan = float("nan")  # llama-cpp-python serves one sequence per context
    return {
        "prefill_tok_s": prefill,
        "decode_b1_tok_s": b1,
        "agg_8_tok_s": nan,
        "agg_32_tok_s": nan,
        "ttft_1500_s": ttft,
        "peak_rss_mib": _peak_rss_mib(),
        "load_s": load_s,
    }


# ---------------------------------------------------------------------- vLLM (HTTP)
def bench_vllm(url: str, decode_tokens: int) -> dict[str, float]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    word = "hello " * 2000

    def one(prompt_words: int, max_tokens: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = 0.0
        count = 0
        stream = client.completions.create(
            model=model,
            prompt=" ".join(word.split()[:prompt_words]),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter() - start
                count += 1
        return first, time.perf_counter() - start, count

    def concurrent(n: int) -> float:
        results: list[int] = []
        start = time.perf_counter()
        threads = [
            threading.Thread(target=lambda: results.append(one(30, decode_tokens)[2]))
            for _ in range(n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(results) / (time.perf_counter() - start)

    one(30, 4)
    prefill_first, _, _ = one(512, 1)
    first, total, count = one(30, decode_tokens)
    return {
        "prefill_tok_s": 512 / prefill_first,
        "decode_b1_tok_s": (count - 1) / (total - first),
        "agg_8_tok_s": concurrent(8),
        "agg_32_tok_s": concurrent(32),
        "ttft_1500_s": one(1500, 1)[0],
        "peak_rss_mib": float("nan"),
        "load_s": float("nan"),  # the server was started beforehand
    }


# ---------------------------------------------------------------------- driver
def _worker(name: str, decode_tokens: int, vllm_url: str | None) -> dict[str, float]:
    if name.startswith("ours-"):
        return bench_ours(name.removeprefix("ours-"), decode_tokens)
    if name == "hf":
        return bench_hf(decode_tokens)
    if name == "llamacpp":
        return bench_llamacpp(decode_tokens)
    if name == "vllm" and vllm_url:
        return bench_vllm(vllm_url, decode_tokens)
    raise SystemExit(f"unknown engine {name!r}")


def _run_subprocess(name: str, args: argparse.Namespace) -> dict[str, float] | str:
    python = sys.executable
    if name == "llamacpp":
        python = str(REPO / ".venv-llamacpp/bin/python")
        if not Path(python).exists():
            return "skipped: .venv-llamacpp not installed"
    command = [python, __file__, "--worker", name, "--decode-tokens", str(args.decode_tokens)]
    if args.vllm_url:
        command += ["--vllm-url", args.vllm_url]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return f"failed (rc {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return dict(json.loads(lines[-1]))


def _format(value: float) -> str:
    return "-" if value != value else (f"{value:.2f}" if value < 10 else f"{value:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--engines",
        default="ours-int8,ours-int4,ours-fp16,ours-int4-compiled,ours-fp16-compiled,hf,llamacpp",
    )
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--vllm-url", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker != "llamacpp":
            import torch

            torch.set_num_threads(2)
        print(json.dumps(_worker(args.worker, args.decode_tokens, args.vllm_url)))
        return
    engines = args.engines.split(",") + (["vllm"] if args.vllm_url else [])
    print(f"load average before: {os.getloadavg()} (shared 2-core machine: figures are noisy)")
    from llm_backend.engine.quantize import cpu_description

    print(f"cpu: {cpu_description()}")
    # resolved once, here: the workers read it (the llama.cpp one has no torch to pull with)
    os.environ["RAGLOOM_BENCH_MODEL"] = str(_model_path())
    results: dict[str, dict[str, float] | str] = {}
    for name in engines:
        started = time.perf_counter()
        results[name] = _run_subprocess(name, args)
        print(f"  {name}: done in {time.perf_counter() - started:.0f}s", flush=True)
    measured = {k: v for k, v in results.items() if isinstance(v, dict)}
    width = max([12, *(len(n) + 1 for n in measured)])
    header = f"{'metric':<18}" + "".join(f"{n:>{width}}" for n in measured) + f"{'target':>10}"
    print(header)
    for metric, (op, target) in TARGETS.items():
        row = f"{metric:<18}" + "".join(f"{_format(r[metric]):>{width}}" for r in measured.values())
        print(row + f"{op + _format(target):>10}")
    # no target: start-up (load, quantize, and for -compiled the decode graphs), and
    # decoding over long cached prompts
    for metric in ("load_s", "long_8_tok_s"):
        row = f"{metric:<18}" + "".join(
            f"{_format(r.get(metric, float('nan'))):>{width}}" for r in measured.values()
        )
        print(row + f"{'-':>10}")
    for name, result in results.items():
        if isinstance(result, str):
            print(f"{name}: {result}")
    for name, ours in measured.items():
        if not name.startswith("ours-"):
            continue
        ratio = ours["decode_b1_tok_s"] / BANDWIDTH_BOUND_TOK_S
        print(
            f"{name} batch-1 decode = {ratio:.0%} of the int8 bandwidth bound "
            f"({BANDWIDTH_BOUND_TOK_S:.0f} tok/s)"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
