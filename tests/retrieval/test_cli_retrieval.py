"""The retrieval CLI (ingest, query, collections) through typer's CliRunner, in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from tests.retrieval.helpers import write_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("cli")
    data, src = root / "data", root / "src"
    write_corpus(src)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGLOOM_DATA_DIR", str(data))
        yield data, src


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and stdout + stderr, interleaved."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def invoke_json(*args: str) -> object:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # progress bars go to stderr


def test_ingest_query_collections_roundtrip(env: tuple[Path, Path]) -> None:
    data, src = env
    code, out = invoke("ingest", str(src), "--collection", "notes")
    assert code == 0, out
    assert sum(line.startswith("added ") for line in out.splitlines()) == 6
    assert "failed 0" in out
    assert (data / "manifest.sqlite").exists() and (data / "chroma").is_dir()

    code, out = invoke("ingest", str(src), "--collection", "notes")
    assert code == 0
    assert sum(line.startswith("unchanged ") for line in out.splitlines()) == 6

    rows = invoke_json(
        "query", "why does the sea rise and fall", "-c", "notes", "-k", "2", "--json"
    )
    assert isinstance(rows, list)
    assert len(rows) == 2 and rows[0]["rank"] == 1
    assert rows[0]["metadata"]["source"].endswith("tides.txt")
    assert rows[0]["dense_score"] is not None and rows[0]["bm25_score"] is not None

    source = str((src / "chess.txt").resolve())
    rows = invoke_json(
        "query", "pieces", "-c", "notes", "--mode", "bm25", "--filter", f"source={source}", "--json"
    )
    assert isinstance(rows, list) and [r["metadata"]["source"] for r in rows] == [source]

    result = CliRunner().invoke(app, ["query", "lava", "-c", "notes", "-k", "1"])
    assert result.exit_code == 0 and result.stdout.startswith("1. ")
    assert "volcano.txt" in result.stdout

    code, out = invoke("collections", "list")
    assert code == 0 and "notes\t6 documents\t6 chunks" in out
    assert list((data / "bm25" / "notes").glob("v-*/vectors.npy"))  # the exact-search copy


def test_exact_search_limit_is_a_setting(
    env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, src = env
    monkeypatch.setenv("RAGLOOM_RETRIEVAL__EXACT_SEARCH_MAX_CHUNKS", "0")
    code, out = invoke("ingest", str(src), "--collection", "hnsw-only")
    assert code == 0, out
    assert not list((data / "bm25" / "hnsw-only").glob("v-*/vectors.npy"))
    rows = invoke_json("query", "lava", "-c", "hnsw-only", "-k", "1", "--mode", "dense", "--json")
    assert isinstance(rows, list) and rows[0]["metadata"]["source"].endswith("volcano.txt")
    monkeypatch.setenv("RAGLOOM_RETRIEVAL__EXACT_SEARCH_MAX_CHUNKS", "-1")
    code, out = invoke("ingest", str(src), "--collection", "hnsw-only")
    assert code != 0 and "Traceback" not in out
    assert "bad setting RAGLOOM_RETRIEVAL__EXACT_SEARCH_MAX_CHUNKS: Input should be" in out


def test_ingest_failures_exit_non_zero_with_reasons(env: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "empty.txt"
    bad.write_text("", encoding="utf-8")
    good = tmp_path / "fine.txt"
    good.write_text("A fine note about lighthouses.", encoding="utf-8")
    code, out = invoke("ingest", str(bad), str(good), "--collection", "mixed")
    assert code == 1
    assert "added     " in out and f"failed    {bad.resolve()}: " in out and "empty" in out

    code, out = invoke("ingest", str(tmp_path / "missing.txt"), "--collection", "mixed")
    assert code == 1 and out.strip() == f"error: no such file or folder: {tmp_path / 'missing.txt'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("query", "x", "-c", "nope"), "error: collection 'nope' does not exist"),
        (("query", "x", "-c", "notes", "--mode", "fuzzy"), "error: --mode must be one of"),
        (("query", "x", "-c", "notes", "-k", "0"), "error: -k must be > 0, got 0"),
        (("query", "x", "-c", "notes", "--filter", "page"), "error: bad --filter 'page'"),
        (("query", "x", "-c", "bad name"), "error: invalid collection name 'bad name'"),
        (("ingest", ".", "-c", "ok1", "--chunk-size", "0"), "error: --chunk-size must be > 0"),
        (("collections", "create", "a"), "error: invalid collection name 'a'"),
        (("collections", "delete", "nope"), "error: collection 'nope' does not exist"),
    ],
)
def test_bad_input_gives_one_line_errors(
    env: tuple[Path, Path], args: tuple[str, ...], message: str
) -> None:
    if args[0] == "query" and "nope" not in args and "bad name" not in args:
        invoke("collections", "create", "notes")  # exists either way
    code, out = invoke(*args)
    assert code == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), out


def test_collections_create_and_delete(env: tuple[Path, Path]) -> None:
    code, out = invoke("collections", "create", "scratch")
    assert code == 0 and "created scratch" in out
    code, out = invoke("collections", "create", "scratch")
    assert code == 1 and "already exists" in out
    assert "scratch\t0 documents" in invoke("collections", "list")[1]
    code, out = invoke("collections", "delete", "scratch")
    assert code == 0 and "deleted scratch" in out
    assert "scratch" not in invoke("collections", "list")[1]
    code, out = invoke("query", "x", "-c", "scratch")
    assert code == 1 and "does not exist" in out
