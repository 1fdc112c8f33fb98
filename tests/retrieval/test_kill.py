"""THE KILL TEST: SIGKILL ``ragloom ingest`` mid-run, run it again, and nothing is lost,
duplicated or half-present."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval.ingest import doc_id_for
from tests.retrieval.helpers import make_ingestor, make_retriever

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_FILES = 150
WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]
RAGLOOM = Path(sys.executable).with_name("ragloom")
REPO = Path(__file__).resolve().parents[2]


def _write_files(folder: Path) -> list[Path]:
    rng = random.Random(7)
    folder.mkdir(parents=True)
    paths = []
    for i in range(N_FILES):
        body = " ".join(rng.choice(WORDS) for _ in range(30))
        path = folder / f"note{i:04d}.txt"
        path.write_text(f"Note {i} carries the marker token zq{i}x.\n\n{body}\n", encoding="utf-8")
        paths.append(path)
    return paths


def _start(src: Path, data: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(
        RAGLOOM_DATA_DIR=str(data),
        RAGLOOM_RETRIEVAL__INGEST_BATCH_CHUNKS="8",  # many small commits to land between
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return subprocess.Popen(
        [str(RAGLOOM), "ingest", str(src), "--collection", "killme"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _kill_after(proc: subprocess.Popen[str], committed_at_least: int, seed: int) -> int:
    """Read progress lines until enough documents are committed, then SIGKILL mid-batch."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 400
    for line in proc.stderr:
        if time.monotonic() > deadline:
            break
        if line.startswith("progress: "):
            done = int(line.split()[1])
            if done >= committed_at_least:
                time.sleep(random.Random(seed).uniform(0.0, 0.4))  # land inside the next batch
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return done
    proc.kill()
    proc.wait()
    pytest.fail(f"ingest ended or stalled before {committed_at_least} documents were committed")


def test_sigkill_mid_ingest_then_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    paths = _write_files(src)

    first = _kill_after(_start(src, data), committed_at_least=24, seed=1)
    second = _kill_after(_start(src, data), committed_at_least=first + 32, seed=2)
    assert second < N_FILES, "the second kill did not land mid-ingest"

    final = _start(src, data)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-2000:]

    ingestor = make_ingestor(data)
    manifest = ingestor.manifest
    docs = manifest.documents("killme")
    assert set(docs) == {doc_id_for(str(p.resolve())) for p in paths}  # every file, once
    assert manifest.pending("killme") == {} and manifest.garbage("killme") == []
    committed = manifest.committed_chunk_ids("killme")
    assert len(committed) == sum(d.n_chunks for d in docs.values())
    chroma_ids = ingestor.chroma.all_ids("killme")
    bm25_ids = ingestor.bm25.all_ids("killme")
    assert ingestor.chroma.count("killme") == len(bm25_ids) == len(committed)
    assert chroma_ids == set(bm25_ids) == committed  # no stray ids on either side
    assert len({i.split(":")[0] for i in committed}) == N_FILES

    ids, texts, _ = manifest.committed_chunks("killme")
    in_chroma = ingestor.chroma.get("killme", ids)
    in_bm25 = ingestor.bm25.lookup("killme", ids)
    for chunk_id, text in zip(ids, texts, strict=True):
        assert in_chroma[chunk_id][0] == text and in_bm25[chunk_id][0] == text

    retriever = make_retriever(data, "killme", k=1)
    for i in random.Random(3).sample(range(N_FILES), 12):
        source = str(paths[i].resolve())
        hit = retriever.search(f"zq{i}x", mode="bm25")[0]
        assert hit.metadata["source"] == source and f"zq{i}x" in hit.text
        dense = retriever.search(hit.text, mode="dense")[0]  # its own text: cosine 1
        assert dense.chunk_id == hit.chunk_id and dense.dense_score == pytest.approx(1.0, abs=1e-3)
