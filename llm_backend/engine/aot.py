"""Decode steps compiled ahead of time (AOTInductor) in a child process.

``torch.compile`` in the serving process costs memory for as long as the process
lives: it imports dynamo and inductor (+113 MiB resident on their own) and keeps its
graphs, guards and generated code (SmolLM2 int4: 915 MiB peak against 552 eager).
Here a child process exports ``Transformer._run`` for one new token per row, with
the batch size and the attended cache length symbolic, and compiles it into a shared
library (``torch._inductor.aoti_compile_and_package``): one per range of batch sizes
in which every quantized linear takes one path (``dense_from_rows``: a linear that
switches to its dense matmul at 32 rows splits the range there). The serving process
loads the libraries through ``torch._C._aoti`` (no inductor import) and hands them
the model's own weights and KV cache as *user-managed* constants: nothing is copied,
and the step's cache writes land in the model's cache, where eager prefill and
prefix copies see them.

The packages are cached on disk under a key of the model file, the quantization, the
cache sizes, this torch build, this CPU and the engine's source, so a later start
loads them in about a second; the first build takes a minute or two per range on a
2-core CPU (in the child, whose memory is returned when it exits).

Example:
    >>> loaded = load_model(path, quant="int4", max_batch=32, max_seq_len=2048)
    >>> folder = build_decode_packages(path, quant="int4", max_batch=32,
    ...                                max_seq_len=2048, aot_dir=default_aot_dir())
    >>> loaded.model.use_aot_decode(AotDecode.load(folder, loaded.model))
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llm_backend.engine.cpu_kernels import load_cpu_kernels
from llm_backend.engine.errors import EngineError
from llm_backend.engine.paths import engine_cache_dir
from llm_backend.engine.quantize import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from llm_backend.engine.model import Transformer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BUILD_TIMEOUT_S = 3600
MIN_SEQ_LEN = 4  # the exported step attends to 2 .. max_seq_len - 1 positions
_ENGINE_DIR = Path(__file__).resolve().parent
_PACKAGE_ROOT = _ENGINE_DIR.parents[1]  # the folder holding llm_backend/


def default_aot_dir() -> Path:
    """``$XDG_CACHE_HOME/ragloom/aot`` (``~/.cache/ragloom/aot``)."""
    return engine_cache_dir("aot")


def decode_batch_ranges(model: Transformer) -> list[tuple[int, int]]:
    """Batch-size ranges ``[(lo, hi), ...]`` covering 1 .. ``model.max_batch`` within
    which every quantized linear of ``model`` takes one path (kernel or dense) for a
    decode step: one compiled library each."""
    cuts: set[int] = set()
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            rows = module.dense_from_rows(model.dtype, model.device.type)
            if rows is not None and 1 < rows <= model.max_batch:
                cuts.add(rows)
    starts = [1, *sorted(cuts)]
    ends = [cut - 1 for cut in sorted(cuts)] + [model.max_batch]
    return list(zip(starts, ends, strict=True))


def package_key(path: Path, quant: str, max_batch: int, max_seq_len: int) -> str:
    """The cache key of the compiled decode step for these load arguments."""
    stat = path.stat()
    digest = hashlib.sha256()
    for part in (
        FORMAT_VERSION,
        path.resolve(),
        stat.st_size,
        stat.st_mtime_ns,
        quant,
        max_batch,
        max_seq_len,
        torch.__version__,
        sys.version,
        _cpu_signature(),
    ):
        digest.update(f"{part}\n".encode())
    # the engine's code shapes the graph, and its C++ kernels are called from it
    digest.update(f"cpu kernels: {load_cpu_kernels()}\n".encode())
    for source in sorted([*_ENGINE_DIR.glob("*.py"), *_ENGINE_DIR.glob("csrc/*")]):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:24]


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (the generated code is built for them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
    except OSError:
        return "unknown"
    return "".join(sorted(set(lines)))


def cached_decode_packages(
    path: str | Path, *, quant: str, max_batch: int, max_seq_len: int, aot_dir: Path
) -> Path | None:
    """The folder ``build_decode_packages`` would return, if the cache holds it."""
    target = aot_dir / package_key(Path(path), quant, max_batch, max_seq_len)
    return target if (target / MANIFEST).is_file() else None


def _remove_abandoned_builds(aot_dir: Path, older_than_s: float) -> None:
    """Delete staging folders of builds that never finished (their server was killed
    mid-build) and that no build could still be writing."""
    now = time.time()
    for staging in aot_dir.glob(".build-*"):
        try:
            if now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:  # removed meanwhile
            continue


def _become_background_child(parent_pid: int) -> None:
    """The build child, started beside a serving engine: yield the CPU to it (nice 10)
    and, on Linux, end when the thread that started the build ends (a server that stops
    abandons its build rather than leave it running)."""
    os.nice(10)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent_pid:  # it ended before the call above
            sys.exit(1)


def build_decode_packages(
    path: str | Path,
    *,
    quant: str,
    max_batch: int,
    max_seq_len: int,
    aot_dir: Path,
    timeout_s: float = BUILD_TIMEOUT_S,
    low_priority: bool = False,
) -> Path:
    """The folder of compiled decode steps for a model loaded with these arguments,
    building it in a child process unless the cache has it.

    Args:
        path: The GGUF file.
        quant: The quantization mode the model was loaded with (not ``auto``).
        max_batch: The model's KV-cache slots.
        max_seq_len: The model's positions per slot (as ``setup_caches`` got them).
        aot_dir: The cache folder; one subfolder per key (``package_key``).
        timeout_s: Give up on a build after this long.
        low_priority: Build at a lower CPU priority (nice 10), for a build running
            beside a serving engine.

    Raises:
        EngineError: The build failed (with the child's last error lines) or timed out.
    """
    path = Path(path)
    if max_seq_len < MIN_SEQ_LEN:
        raise EngineError(f"compile_decode needs max_seq_len >= {MIN_SEQ_LEN}, got {max_seq_len}")
    target = aot_dir / package_key(path, quant, max_batch, max_seq_len)
    if (target / MANIFEST).is_file():
        return target
    aot_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(aot_dir, older_than_s=timeout_s)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=aot_dir))
    command = [
        sys.executable,
        "-m",
        "llm_backend.engine.aot",
        str(path),
        f"--quant={quant}",
        f"--max-batch={max_batch}",
        f"--max-seq-len={max_seq_len}",
        f"--out={staging}",
    ]
    if low_priority:
        command.append(f"--background-of={os.getpid()}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_PACKAGE_ROOT), env.get("PYTHONPATH"))))
    logger.info("compiling the decode step ahead of time into %s (once; minutes)", target)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise EngineError(f"building the compiled decode step failed: {tail}")
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / MANIFEST).is_file():
                raise
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"building the compiled decode step took over {timeout_s:.0f}s") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _DecodeStep(nn.Module):
    """What is exported: one decode step with every shape that varies an input's.

    ``kv_positions`` is ``key_positions[:kv_len]``: the attended length travels as a
    tensor's size, so it is symbolic in the graph rather than a constant.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: Tensor,  # (B, 1) long
        input_pos: Tensor,  # (B, 1) long
        slots: Tensor,  # (B,) long
        kv_positions: Tensor,  # (S,) long
    ) -> Tensor:  # (B, 1, V) float32
        S = kv_positions.shape[0]
        return self.model._run(tokens, input_pos, slots[:, None], None, S, compiled=True)


def _model_tensors(model: nn.Module, prefix: str = "model.") -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by its name in the exported step (tied
    weights under each of their names)."""
    named: dict[str, Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[prefix + name] = param.detach()
    for name, buffer in model.named_buffers(remove_duplicate=False):
        named[prefix + name] = buffer
    return named


def _int4_group_size(model: nn.Module) -> int | None:
    """The group size every int4 linear uses (None: no int4 kernel linears)."""
    sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear) and m.use_kernel}
    if len(sizes) > 1:
        raise EngineError(f"int4 linears with several group sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _export_range(model: Transformer, low: int, high: int, file: Path) -> None:
    """Export and compile the decode step for batch sizes ``low..high`` into ``file``."""
    import torch._inductor
    from torch.export import Dim, export

    example_batch = high if low == high else min(max(low, 4), high)  # 0, 1 specialize
    batch = None if low == high else Dim("batch", min=low, max=high)
    # kv_len == max_seq_len slices the whole cache, a case export specializes: eager
    kv_len = Dim("kv_len", min=2, max=model.max_seq_len - 1)
    example = (
        torch.zeros(example_batch, 1, dtype=torch.long),
        torch.full((example_batch, 1), 2, dtype=torch.long),
        torch.arange(example_batch),
        torch.arange(min(6, model.max_seq_len - 1)),  # not a view: export would give
        # its base a size symbol too, and fail on it by the hash seed's luck
    )
    dims = ({0: batch}, {0: batch}, {0: batch}, {0: kv_len})
    with torch.inference_mode():
        program = export(_DecodeStep(model).eval(), example, dynamic_shapes=dims, strict=False)
    torch._inductor.aoti_compile_and_package(
        program,
        package_path=str(file),
        # the weights and the cache come from the serving process (AotDecode.load)
        inductor_configs={"aot_inductor.package_constants_in_so": False},
    )


def _build(path: Path, quant: str, max_batch: int, max_seq_len: int, out: Path) -> None:
    """The child process's work: load the model as the server does, export and compile
    each batch range, and write the manifest ``AotDecode.load`` checks."""
    from llm_backend.engine.loader import load_model

    model = load_model(path, quant=quant, max_batch=max_batch, max_seq_len=max_seq_len).model
    if (model.max_batch, model.max_seq_len) != (max_batch, max_seq_len):
        raise EngineError(
            f"the model loaded with {model.max_batch} slots x {model.max_seq_len} positions, "
            f"not {max_batch} x {max_seq_len}"
        )
    named = _model_tensors(model)
    group_size = _int4_group_size(model)
    packages = []
    constants: dict[str, dict[str, Any]] = {}
    for low, high in decode_batch_ranges(model):
        file = out / f"decode-b{low}-{high}.pt2"
        _export_range(model, low, high, file)
        loader = torch._C._aoti.AOTIModelPackageLoader(str(file), "model", False, 1, -1)
        added = []
        for name in loader.get_constant_fqns():
            if name in named:
                tensor = named[name]
                constants[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype)}
            elif group_size is not None:  # the int4 kernel's group size, as an int64 scalar
                added.append(name)
            else:
                raise EngineError(f"the compiled step needs a constant {name!r} of unknown value")
        packages.append(
            {"file": file.name, "low": low, "high": high, "group_size_constants": added}
        )
        logger.info("compiled decode for batch %d..%d", low, high)
    manifest = {
        "format": FORMAT_VERSION,
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
        "group_size": group_size,
        "packages": packages,
        "constants": constants,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


@dataclass
class _Runner:
    low: int
    high: int
    loader: Any  # torch._C._aoti.AOTIModelPackageLoader


class AotDecode:
    """Compiled decode steps bound to one model's tensors; ``Transformer.forward`` calls
    it for steps of one new token per row that a compiled batch range covers.

    Build with ``AotDecode.load(folder, model)`` (``folder`` from
    ``build_decode_packages``). The model's tensors must outlive it (they are its
    constants, not copied); ``Transformer.setup_caches`` drops it for that reason.
    """

    def __init__(self, runners: list[_Runner], key_positions: Tensor, kept: list[Tensor]) -> None:
        self.max_batch = max(runner.high for runner in runners)
        self.max_kv_len = key_positions.shape[0] - 1
        self._key_positions = key_positions  # (S_max,) long
        self._by_batch: list[Any] = [None] * (self.max_batch + 1)
        for runner in runners:
            for batch in range(runner.low, runner.high + 1):
                self._by_batch[batch] = runner.loader
        self._kept = kept  # scalars made here for the loaders (user-managed: kept alive)
        self.calls = 0

    @classmethod
    def load(cls, folder: Path, model: Transformer) -> AotDecode:
        """Load ``folder``'s libraries and bind them to ``model``'s weights and cache.

        Raises:
            EngineError: The folder was built for another model or cache shape.
        """
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"no readable compiled decode step in {folder}: {exc}") from exc
        if (manifest.get("max_batch"), manifest.get("max_seq_len")) != (
            model.max_batch,
            model.max_seq_len,
        ):
            raise EngineError(
                f"{folder} was compiled for {manifest.get('max_batch')} slots x "
                f"{manifest.get('max_seq_len')} positions; the model has "
                f"{model.max_batch} x {model.max_seq_len}"
            )
        named = _model_tensors(model)
        for name, spec in manifest["constants"].items():
            tensor = named.get(name)
            if tensor is None or [list(tensor.shape), str(tensor.dtype)] != [
                spec["shape"],
                spec["dtype"],
            ]:
                raise EngineError(f"{folder} does not match the model (tensor {name}); delete it")
        group_size = torch.tensor(manifest["group_size"] or 0, dtype=torch.int64)
        load_cpu_kernels()  # the steps may call ragloom's operators (the key says whether)
        runners = []
        for package in manifest["packages"]:
            try:
                loader = torch._C._aoti.AOTIModelPackageLoader(
                    str(folder / package["file"]), "model", False, 1, -1
                )
                fqns = loader.get_constant_fqns()
                constants = {name: named[name] for name in fqns if name in named}
                constants.update(dict.fromkeys(package["group_size_constants"], group_size))
                # user-managed: the library keeps these pointers (no copy), so the cache
                # writes of a compiled step land in the model's own cache
                loader.load_constants(constants, False, True, True, False)
            except RuntimeError as exc:
                raise EngineError(f"cannot load {folder / package['file']}: {exc}") from exc
            runners.append(_Runner(package["low"], package["high"], loader))
        return cls(runners, model.key_positions, [group_size])

    def covers(self, batch: int, kv_len: int) -> bool:
        """Whether a compiled step exists for ``batch`` rows attending to ``kv_len``."""
        return 1 <= batch <= self.max_batch and 2 <= kv_len <= self.max_kv_len

    def __call__(
        self,
        tokens: Tensor,  # (B, 1) long
        input_pos: Tensor,  # (B, 1) long
        slots: Tensor,  # (B,) long
        kv_len: int,
    ) -> Tensor:  # (B, 1, V) float32
        loader = self._by_batch[tokens.shape[0]]
        self.calls += 1
        inputs = [tokens.contiguous(), input_pos.contiguous(), slots.contiguous()]
        return loader.boxed_run([*inputs, self._key_positions[:kv_len]])[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m llm_backend.engine.aot MODEL --quant Q --max-batch N --max-seq-len S
    --out DIR``: the child process ``build_decode_packages`` starts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("model", type=Path)
    parser.add_argument("--quant", required=True)
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--max-seq-len", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--background-of", type=int, default=None, help="the serving pid")
    args = parser.parse_args(argv)
    if args.background_of is not None:
        _become_background_child(args.background_of)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _build(args.model, args.quant, args.max_batch, args.max_seq_len, args.out)
    except EngineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
