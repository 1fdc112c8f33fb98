"""No thread but the engine's keeps an OpenMP worker pool (``llm_backend.threads``).

libgomp gives each thread that starts a parallel region a pool of its own; once the
process holds more pool workers than CPUs, every parallel region of the engine's
decode steps waits on a futex (decode 130 -> 44 tok/s on the 2-core kind). Pool
workers are native threads, so a fresh process counts its native threads (OS threads
less Python's) after each step that runs tensor work on behalf of a caller: loading a
model, making an engine, embedding a query and documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads(2)  # a pool has a worker whatever the CPU count
import sentence_transformers  # its imports start native threads of their own (BLAS, arrow)
from llm_backend.engine.async_engine import AsyncEngine
from llm_backend.engine.loader import load_model
from retrieval.embedding import SentenceTransformerEmbedder

def os_threads(settle=None):
    # an exited thread's pool workers end a moment after it: wait (up to 5 s) for
    # the count to come down to ``settle``
    deadline = time.monotonic() + 5
    while True:
        # native threads: OS threads less Python's own (tqdm's monitor and the like)
        count = len(os.listdir("/proc/self/task")) - threading.active_count()
        if settle is None or count <= settle or time.monotonic() > deadline:
            return count
        time.sleep(0.05)

base = os_threads()
counts = {"imported": base}
loaded = load_model(sys.argv[1], max_batch=2, max_seq_len=64)
counts["loaded"] = os_threads(base)
engine = AsyncEngine(loaded)
counts["engine made"] = os_threads(base)
embedder = SentenceTransformerEmbedder("all-MiniLM-L6-v2")
embedder.embed_query("how long is the cooling-off period?")
embedder.embed_documents(["one passage", "another passage"])
counts["embedded"] = os_threads(base)
torch.randn(1_000_000).add_(1)  # the control: this thread's own parallel region
time.sleep(0.5)
counts["main thread ran a parallel op"] = os_threads()
print(json.dumps(counts))
"""


@pytest.mark.integration
def test_loading_engines_and_embedding_leave_no_pool_in_the_callers_thread(
    smollm2_gguf_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm2_gguf_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    base = counts["imported"]
    assert counts["loaded"] == base, counts
    assert counts["engine made"] == base, counts
    assert counts["embedded"] == base, counts
    # the count does see a pool: one worker more once this thread ran a parallel op
    assert counts["main thread ran a parallel op"] == base + 1, counts
