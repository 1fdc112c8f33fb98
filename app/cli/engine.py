"""CLI commands: ``ragloom engine serve`` (our engine behind an OpenAI-compatible server)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from app.cli._common import fail, load_settings

engine_app = typer.Typer(help="Our in-house inference engine.", no_args_is_help=True)
logger = logging.getLogger(__name__)


@engine_app.command("serve")
def serve(
    model: Annotated[
        str, typer.Option("--model", help="A .gguf path or a registry name (smollm2-135m).")
    ],
    host: Annotated[str, typer.Option("--host", help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="Weights: auto (int4 for Q4_1 files, else int8) | int8 | int4 | fp16 (CPU: "
            "fastest for many users, more memory) | bf16 | fp32 "
            "[default: RAGLOOM_ENGINE__QUANT, auto].",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Concurrent sequences (KV-cache slots).")
    ] = 8,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="Context length per sequence.")
    ] = 4096,
    max_waiting: Annotated[
        int, typer.Option("--max-waiting", help="Queued requests before 503.")
    ] = 64,
    prefill_chunk: Annotated[
        int,
        typer.Option("--prefill-chunk", help="Prompt tokens per prefill step while others decode."),
    ] = 512,
    idle_prefill_chunk: Annotated[
        int,
        typer.Option(
            "--idle-prefill-chunk",
            help="Prompt tokens per prefill step when nothing decodes (a lone prompt in "
            "one step is faster).",
        ),
    ] = 2048,
    served_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model id clients send.")
    ] = None,
    models_dir: Annotated[
        Path | None, typer.Option("--models-dir", help="Where registry models live.")
    ] = None,
    compile_decode: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Compile the decode step before serving (~2x faster decode; the first "
            "start builds it for a few minutes, cached after) or not at all "
            "[default: RAGLOOM_ENGINE__COMPILE_DECODE, background: serve at once, "
            "switch to the compiled step when its build is done].",
        ),
    ] = None,
) -> None:
    """Load a GGUF model and serve /v1/chat/completions, /v1/completions, /metrics."""
    if not 1 <= port <= 65535:
        fail(f"--port must be in [1, 65535], got {port}")
    if max_batch < 1:
        fail(f"--max-batch must be >= 1, got {max_batch}")
    for flag, value in (
        ("--prefill-chunk", prefill_chunk),
        ("--idle-prefill-chunk", idle_prefill_chunk),
    ):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    import uvicorn

    from llm_backend.engine.async_engine import AsyncEngine
    from llm_backend.engine.errors import EngineError
    from llm_backend.engine.loader import load_model
    from llm_backend.engine.registry import resolve_model
    from llm_backend.engine.scheduler import SchedulerConfig
    from llm_backend.engine.server import create_app

    settings = load_settings(fresh=False)
    models_dir = models_dir if models_dir is not None else settings.models_dir
    quant = quant if quant is not None else settings.engine.quant
    compile_mode = settings.engine.compile_decode if compile_decode is None else compile_decode
    try:
        path = resolve_model(model, models_dir)
        loaded = load_model(
            path,
            quant=quant,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            compile_decode=compile_mode,
        )
        config = SchedulerConfig(
            max_running=max_batch,
            max_waiting=max_waiting,
            prefill_chunk=prefill_chunk,
            idle_prefill_chunk=idle_prefill_chunk,
        )
        name = served_name or (model if not model.endswith(".gguf") else Path(model).stem)
        engine = AsyncEngine(loaded, model_name=name, config=config).start()
    except EngineError as exc:
        fail(str(exc))
    typer.echo(f"serving {name} ({quant}, {max_batch} slots) on http://{host}:{port}/v1", err=True)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
    finally:
        engine.stop()


def register(app: typer.Typer) -> None:
    """Add ``ragloom engine ...`` to the main app."""
    app.add_typer(engine_app, name="engine")
