"""Single-stream engine benchmark: prefill and decode speed of SmolLM2-135M per precision.

Prints, for fp32 / bf16 / int8 / int4: prefill tok/s (a 512-token prompt), decode tok/s
at batch 1 and aggregate tok/s for a static batch of 8, the ratio of batch-1 decode to
the int8 memory-bandwidth bound (~205 tok/s on this machine kind: 27.6 GB/s over
~134 MB of int8 weights read per token), and the process RSS.

The machine is shared: the load average is printed first; figures taken under load are
noisy (and OpenMP threads spin while a sibling is descheduled, so try --threads 1 too).

Usage:
    .venv/bin/python benchmarks/engine_core.py [--quants int8,int4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from llm_backend.engine.generate import decode_one_token, prefill
from llm_backend.engine.loader import load_model
from llm_backend.engine.registry import pull_model
from llm_backend.engine.sampling import BatchSamplingTensors, SamplingParams

BANDWIDTH_BOUND_TOK_S = 205.0
PEERS = "llama.cpp Q4_1: 286 prefill / 72 decode; transformers fp32: 877 / 25 (DESIGN.md)"
TEXT = Path(__file__).resolve().parents[2] / "shared/data/docs-samples/rst/json.rst.txt"


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _prompt(tokenizer_encode: object, n_tokens: int) -> list[int]:
    text = TEXT.read_text(encoding="utf-8") if TEXT.exists() else "The quick brown fox. " * 400
    ids = tokenizer_encode(text)  # type: ignore[operator]
    while len(ids) < n_tokens:
        ids = ids + ids
    return list(ids[:n_tokens])


def _decode_rate(loaded: object, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """Aggregate decode tok/s for ``batch`` rows, each already holding ``prompt_len`` tokens."""
    model = loaded.model  # type: ignore[attr-defined]
    params = BatchSamplingTensors.from_params(
        [SamplingParams(temperature=0.0)] * batch, model.args.vocab_size
    )
    tokens = torch.full((batch, 1), 42, dtype=torch.long)
    positions = torch.full((batch, 1), prompt_len, dtype=torch.long)
    for _ in range(3):  # warm up
        decode_one_token(model, tokens, positions, None, params, kv_len=prompt_len + 1)
    started = time.perf_counter()
    cpu_started = time.process_time()
    for step in range(steps):
        next_tokens, _ = decode_one_token(
            model, tokens, positions, None, params, kv_len=prompt_len + step + 1
        )
        tokens = next_tokens[:, None]
        positions = positions + 1
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return batch * steps / wall, batch * steps / cpu


def bench(path: Path, quant: str, prompt_tokens: int, decode_steps: int) -> dict[str, float]:
    """Measure one precision."""
    started = time.perf_counter()
    loaded = load_model(path, quant=quant, max_batch=8, max_seq_len=1024)
    load_s = time.perf_counter() - started
    ids = _prompt(loaded.tokenizer.encode, prompt_tokens)
    model = loaded.model
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    prefill(model, tokens[:, :32], positions[:, :32], None, kv_len=32)  # warm up
    times, cpu_times = [], []
    for _ in range(2):
        started, cpu_started = time.perf_counter(), time.process_time()
        prefill(model, tokens, positions, None, kv_len=len(ids))
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    rss_after_prefill = _rss_mib()
    # Batch 8: fill every slot with the prompt, then decode all rows together.
    for slot in range(1, 8):
        model.copy_slot_prefix(0, slot, len(ids))
    decode_1 = _decode_rate(loaded, 1, len(ids), decode_steps)
    decode_8 = _decode_rate(loaded, 8, len(ids), decode_steps)
    return {
        "load_s": load_s,
        "prefill": len(ids) / min(times),
        "prefill_cpu": len(ids) / min(cpu_times),
        "decode_1": decode_1[0],
        "decode_1_cpu": decode_1[1],
        "decode_8": decode_8[0],
        "decode_8_cpu": decode_8[1],
        "rss_mib": rss_after_prefill,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF path (default: SmolLM2)")
    parser.add_argument("--quants", default="fp32,bf16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or pull_model(
        "smollm2-135m",
        Path(os.environ.get("RAGLOOM_MODELS_DIR", Path.home() / ".cache/ragloom/models")),
    )
    print(f"model {path.name}; threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    print(f"peers: {PEERS}")
    print(
        "wall = wall-clock rate; cpu = tokens per CPU-second of this process (with 1 thread,"
        " what an idle core would do; with 2 it counts OpenMP spin-waits)"
    )
    header = f"{'quant':6} {'prefill wall/cpu':>17} {'decode b1 wall/cpu':>19} {'cpu/205':>7} "
    header += f"{'decode b8 wall/cpu':>19} {'RSS MiB':>8} {'load s':>7}"
    print(header)
    for quant in args.quants.split(","):
        with torch.inference_mode():
            r = bench(path, quant, args.prompt_tokens, args.decode_steps)
        print(
            f"{quant:6} {r['prefill']:8.0f}/{r['prefill_cpu']:<8.0f} "
            f"{r['decode_1']:9.1f}/{r['decode_1_cpu']:<9.1f} "
            f"{r['decode_1_cpu'] / BANDWIDTH_BOUND_TOK_S:7.2f} "
            f"{r['decode_8']:9.1f}/{r['decode_8_cpu']:<9.1f} "
            f"{r['rss_mib']:8.0f} {r['load_s']:7.1f}",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load average at the end {os.getloadavg()[0]:.1f}; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
