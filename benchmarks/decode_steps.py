"""Decode step time by batch size and attended context: our eager step beside our
compiled (ahead-of-time) step, and transformers' step at the same shapes.

A decode step reads every row's cached keys and values, so its cost grows with the
context: RAG prompts carry 1,000+ tokens, and this is where many users over long
prompts spend their time. Each cell is the median of 6 steps of one new token per
row, every row attending to ``context`` cached positions (SmolLM2-135M int4, cache
of 32 slots x 2,048 positions; the compiled step is built once and cached, a few
minutes the first time). transformers (fp32 GGUF load, its dynamic cache) runs the
same shapes where ``--hf`` is given (slow: it prefills rows x context tokens first).

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decode_steps.py [--rows 1,8,32]
        [--contexts 64,512,1500] [--quant int4] [--hf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _median_ms(step: Any, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3  # the first one warms up


def _ours(path: Path, quant: str, rows: list[int], contexts: list[int]) -> dict[str, float]:
    from llm_backend.engine.loader import load_model

    loaded = load_model(path, quant=quant, max_batch=32, max_seq_len=2048, compile_decode=True)
    model = loaded.model
    aot = model._aot_decode
    results: dict[str, float] = {}
    with torch.inference_mode():
        for batch in rows:
            tokens = torch.randint(0, 1000, (batch, 1))
            slots = torch.arange(batch)
            for context in contexts:
                positions = torch.full((batch, 1), context - 1)
                for name, decode in (("eager", None), ("compiled", aot)):
                    model.use_aot_decode(decode)
                    results[f"{name} {batch} {context}"] = _median_ms(
                        lambda: model(tokens, positions, slots, kv_len=context, first_slot=0),  # noqa: B023
                    )
    return results


def _hf(path: Path, rows: list[int], contexts: list[int]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    results: dict[str, float] = {}
    with torch.inference_mode():
        for batch in rows:
            for context in contexts:
                ids = torch.randint(0, 1000, (batch, context - 1))
                cache = model(ids, use_cache=True).cache
                token = torch.randint(0, 1000, (batch, 1))

                def step(token: torch.Tensor = token, cache: Any = cache) -> None:
                    model(token, cache=cache, use_cache=True)
                    cache.crop(-1)  # back to context - 1 cached positions

                results[f"hf {batch} {context}"] = _median_ms(step)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--contexts", default="64,512,1500")
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--hf", action="store_true", help="also time transformers")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(2)
    from llm_backend.engine.quantize import cpu_description
    from llm_backend.engine.registry import pull_model

    cache = Path(os.environ.get("RAGLOOM_MODELS_DIR", "~/.cache/ragloom/models")).expanduser()
    path = pull_model("smollm2-135m", cache)
    print(f"cpu: {cpu_description()}; load average {os.getloadavg()}")
    results = _ours(path, args.quant, rows, contexts)
    engines = [f"{args.quant}-eager", f"{args.quant}-compiled"]
    if args.hf:
        results.update(_hf(path, rows, contexts))
        engines.append("hf-fp32")
    print(f"{'rows':>5}{'context':>9}" + "".join(f"{e + ' ms':>20}" for e in engines))
    for batch in rows:
        for context in contexts:
            cells = [results[f"eager {batch} {context}"], results[f"compiled {batch} {context}"]]
            if args.hf:
                cells.append(results[f"hf {batch} {context}"])
            print(f"{batch:>5}{context:>9}" + "".join(f"{c:>20.1f}" for c in cells))


if __name__ == "__main__":
    main()
