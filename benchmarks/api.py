"""API benchmark: what the REST layer adds, and streaming chats under concurrency.

Part 1, overhead (sequential, loopback): ``POST /api/search`` and
``POST /api/chat`` (rag, non-streaming) through uvicorn against the same
pipeline called in-process (``HybridRetriever.search`` / ``RagAnswerer.answer``),
over a real Chroma + MiniLM collection, with an instant scripted LLM so only the
service layers differ. Prints p50/p95 of both and the p50 added latency.

Part 2, concurrency: ``ragloom serve`` in a subprocess with our engine
in-process (SmolLM2, ``--max-batch`` slots) or ``--backend-url``; 16 and 32
concurrent streaming ``/api/chat`` requests (mode llm): TTFT p50/p95, aggregate
tokens/s and errors (must be 0), beside the same load sent straight to the
backend (``ChatBackend.stream`` in-process) as the peer.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/api.py [--requests 50] \\
        [--concurrency 16,32] [--max-tokens 32] [--backend-url http://127.0.0.1:8080/v1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

QUESTION = "How long do refunds take?"
DOCS = {
    "faq.md": "# Refunds\n\nRefunds are paid back to the original card within 5 business days.\n\n"
    "# Shipping\n\nParcels ship from the Rotterdam warehouse with DHL in two days.\n",
    "pets.md": "# Pets\n\nOne dog or cat per room, for a fee of 25 euros per night.\n",
}
PROMPT = "Write a short poem about the sea."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(label: str, ours: float, peer: float, unit: str) -> str:
    ratio = ours / peer if peer else float("nan")
    return f"  {label:<34} {ours:>10.2f} {unit:<4} {peer:>10.2f} {unit:<4} x{ratio:.2f}"


# -- part 1: overhead ------------------------------------------------------------------


def overhead(requests: int) -> None:
    import uvicorn

    from agents import RagAnswerer, RagConfig
    from app.main import create_app
    from app.settings import ApiSettings, Settings
    from llm_backend import ChatResponse, ScriptedBackend, Usage
    from retrieval import SentenceTransformerEmbedder

    answer = ChatResponse("Refunds take 5 business days [1].", usage=Usage(50, 8))
    backend = ScriptedBackend([answer] * (3 * requests + 10))
    embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
    embedder.warm_up()
    data_dir = Path(tempfile.mkdtemp(prefix="ragloom-bench-api-"))
    settings = Settings(
        data_dir=data_dir, api=ApiSettings(auth="off", rate_limit_per_minute=1_000_000)
    )
    app = create_app(settings, backend=backend, embedder=embedder)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        client.post("/api/collections", json={"name": "bench"}).raise_for_status()
        files = [("files", (n, t.encode(), "text/markdown")) for n, t in DOCS.items()]
        job = client.post("/api/collections/bench/documents", files=files).json()
        while job["status"] not in ("succeeded", "failed"):
            time.sleep(0.1)
            job = client.get(f"/api/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        state = app.state.ragloom
        retriever = state.collections.retriever("local", "bench", 5)
        answerer = RagAnswerer(retriever, backend, RagConfig(k=5, min_score=0.0))

        def timed(ours: Any, peer: Any) -> tuple[list[float], list[float]]:
            """Interleaved timings (ms) so both sides see the same machine load."""
            ours(), peer()  # warm-up
            a, b = [], []
            for _ in range(requests):
                for fn, out in ((ours, a), (peer, b)):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1000)
            return a, b

        search_body = {"query": QUESTION, "collection": "bench", "k": 5}
        chat_body = {"message": QUESTION, "collection": "bench", "stream": False}
        state.settings.agent.min_score = 0.0
        api_search, lib_search = timed(
            lambda: client.post("/api/search", json=search_body).raise_for_status(),
            lambda: retriever.search(QUESTION, k=5),
        )
        api_chat, lib_chat = timed(
            lambda: client.post("/api/chat", json=chat_body).raise_for_status(),
            lambda: asyncio.run(answerer.answer(QUESTION)),
        )
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)

    print(f"\nAPI overhead ({requests} sequential requests, loopback, instant scripted LLM)")
    print(f"  {'':<34} {'API':>15} {'in-process':>15}  ratio")
    for label, ours, peer in [
        ("search p50", api_search, lib_search),
        ("chat (rag, non-stream) p50", api_chat, lib_chat),
    ]:
        print(_row(label, _pct(ours, 0.5), _pct(peer, 0.5), "ms"))
        print(_row(label.replace("p50", "p95"), _pct(ours, 0.95), _pct(peer, 0.95), "ms"))
    print(
        f"  added latency p50: search {_pct(api_search, 0.5) - _pct(lib_search, 0.5):+.2f} ms, "
        f"chat {_pct(api_chat, 0.5) - _pct(lib_chat, 0.5):+.2f} ms"
    )


# -- part 2: concurrent streaming ------------------------------------------------------


async def _api_stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[float, int]:
    body = {
        "message": PROMPT,
        "mode": "llm",
        "sampling": {"max_tokens": max_tokens, "temperature": 0},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = pieces = 0
    event = ""
    async with client.stream("POST", "/api/chat", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token":
                    pieces += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                elif event == "done":
                    usage = json.loads(line[5:])["usage"]
                    tokens = usage["completion_tokens"] if usage else pieces
                elif event == "error":
                    raise RuntimeError(line)
    if ttft is None:
        raise RuntimeError("no token")
    return ttft, tokens


async def _direct_stream(backend: Any, max_tokens: int) -> tuple[float, int]:
    from llm_backend import ChatMessage, ChatRequest, SamplingOptions

    request = ChatRequest(
        [ChatMessage.user(PROMPT)], sampling=SamplingOptions(max_tokens=max_tokens, temperature=0)
    )
    t0 = time.perf_counter()
    ttft = None
    tokens = pieces = 0
    async for chunk in backend.stream(request):
        if chunk.delta:
            pieces += 1
            ttft = ttft if ttft is not None else time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    if ttft is None:
        raise RuntimeError("no token")
    return ttft, tokens or pieces


async def _load(make: Any, concurrency: int) -> dict[str, float]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(make() for _ in range(concurrency)), return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors[:3]:
        print(f"    error: {err}", file=sys.stderr)
    ttfts = [r[0] * 1000 for r in ok]
    return {
        "ttft_p50": _pct(ttfts, 0.5),
        "ttft_p95": _pct(ttfts, 0.95),
        "tok_s": sum(r[1] for r in ok) / wall,
        "errors": float(len(errors)),
    }


def concurrency(levels: list[int], max_tokens: int, backend_url: str | None) -> None:
    from app.services.wiring import build_backend
    from app.settings import Settings

    port = _free_port()
    data_dir = tempfile.mkdtemp(prefix="ragloom-bench-serve-")
    env = {
        **os.environ,
        "RAGLOOM_DATA_DIR": data_dir,
        "RAGLOOM_API__AUTH": "off",
        "RAGLOOM_API__RATE_LIMIT_PER_MINUTE": "1000000",
        "RAGLOOM_ENGINE__MAX_BATCH": str(max(levels)),
        "RAGLOOM_ENGINE__MAX_SEQ_LEN": "1024",
    }
    if backend_url:
        env.update(RAGLOOM_AGENT__BACKEND="openai", RAGLOOM_AGENT__BASE_URL=backend_url)
    ragloom = Path(sys.executable).with_name("ragloom")
    server = subprocess.Popen(
        [str(ragloom), "serve", "--port", str(port), "--log-level", "warning"], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("ragloom serve did not become ready")
            time.sleep(0.5)
        api_rows = {}

        async def via_api(n: int) -> dict[str, float]:
            limits = httpx.Limits(max_connections=n + 4)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
                await _api_stream(client, 4)  # warm-up
                return await _load(lambda: _api_stream(client, max_tokens), n)

        for n in levels:
            api_rows[n] = asyncio.run(via_api(n))
    finally:
        server.terminate()
        server.wait(timeout=30)

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    settings.engine.max_batch = max(levels)
    settings.engine.max_seq_len = 1024
    kind = "openai" if backend_url else "engine"
    backend = build_backend(settings, kind, backend_url, None)

    async def direct(n: int) -> dict[str, float]:
        await _direct_stream(backend, 4)
        return await _load(lambda: _direct_stream(backend, max_tokens), n)

    direct_rows = {n: asyncio.run(direct(n)) for n in levels}
    close = getattr(backend, "close", None)
    if callable(close):
        close()

    print(f"\nConcurrent streaming chats (mode llm, max_tokens {max_tokens}, backend {kind})")
    print(f"  {'':<34} {'via API':>15} {'direct':>15}  ratio")
    for n in levels:
        a, d = api_rows[n], direct_rows[n]
        print(_row(f"{n} users: TTFT p50", a["ttft_p50"], d["ttft_p50"], "ms"))
        print(_row(f"{n} users: TTFT p95", a["ttft_p95"], d["ttft_p95"], "ms"))
        print(_row(f"{n} users: tokens/s", a["tok_s"], d["tok_s"], "t/s"))
        print(
            f"  {n} users: errors {int(a['errors'])} via API, {int(d['errors'])} direct (target 0)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="Sequential requests (part 1).")
    parser.add_argument("--concurrency", default="16,32", help="Comma-separated user counts.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--backend-url", default=None, help="OpenAI-compatible server instead.")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    args = parser.parse_args()
    if not args.skip_overhead:
        overhead(args.requests)
    if not args.skip_concurrency:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
        concurrency(levels, args.max_tokens, args.backend_url)


if __name__ == "__main__":
    main()
