"""Parse a file in a child process that is killed when it runs past its timeout."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from retrieval.loaders.options import LoaderLimits, TableOptions
from retrieval.types import LoaderError, SourceDocument

logger = logging.getLogger(__name__)

# Imported once by the fork server, so each child starts with the parsers loaded.
_PRELOAD = [
    "__main__",
    "retrieval.loaders",
    "pypdf",
    "docx",
    "bs4",
    "soupsieve",
    "lxml.etree",
    "docutils.core",
    "docutils.parsers.rst",
    "markdown_it",
    "charset_normalizer",
]


@functools.cache
def _context() -> BaseContext:
    """The forkserver context: children fork from a clean server that never ran torch.

    The server preloads the loader modules, so each child starts in milliseconds
    instead of re-importing pypdf, bs4 and docutils. As with any forkserver or
    spawn use, the main script must keep its work under ``if __name__ == "__main__":``
    (the server imports the main module once, as ``__mp_main__``).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # type: ignore[attr-defined]
    return ctx


def _child_main(
    conn: Connection, path: str, limits: LoaderLimits, table: TableOptions | None
) -> None:
    """Entry point of the child: load the file and send back (status, payload)."""
    from retrieval.loaders import load_file

    result: tuple[str, Any]
    try:
        result = ("ok", load_file(path, limits=limits, table=table))
    except LoaderError as exc:
        result = ("error", str(exc))
    except Exception as exc:  # the parent must get a message, never a silent death
        result = ("error", f"{path}: parser failed ({type(exc).__name__}: {exc})")
    try:
        conn.send(result)
    finally:
        conn.close()


def load_file_isolated(
    path: str | Path,
    *,
    limits: LoaderLimits | None = None,
    table: TableOptions | None = None,
) -> list[SourceDocument]:
    """Like ``load_file``, but parse in a child process killed after ``parse_timeout_s``.

    A hostile or pathological file can hang or balloon a parser; here it costs at
    most the timeout and never the caller's process. The documents come back pickled.

    Example:
        >>> docs = load_file_isolated("manual.pdf", limits=LoaderLimits(parse_timeout_s=30))
        >>> [b.page for b in docs[0].blocks][:3]
        [1, 2, 3]

    Raises:
        LoaderError: anything ``load_file`` raises, ``parsing X timed out after N s``,
            or the child dying without an answer (e.g. killed for memory).
    """
    limits = limits or LoaderLimits()
    source = str(Path(path).expanduser().resolve())
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(  # type: ignore[attr-defined]
        target=_child_main,
        args=(sender, str(path), limits, table),
        name=f"ragloom-loader:{Path(path).name}",
        daemon=True,
    )
    started = time.monotonic()
    try:
        process.start()
    finally:
        sender.close()
    try:
        ready = wait([receiver, process.sentinel], timeout=limits.parse_timeout_s)
        if not ready:
            raise LoaderError(
                f"parsing {source} timed out after {limits.parse_timeout_s:g} s (child killed)"
            )
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join(timeout=5)
            hint = (
                " (a script that calls load_file_isolated needs the "
                "`if __name__ == '__main__':` guard)"
                if process.exitcode == 1
                else ""
            )
            raise LoaderError(
                f"parsing {source} failed: the parser process died "
                f"(exit code {process.exitcode}){hint}"
            ) from None
    finally:
        if process.is_alive():
            process.kill()
        process.join(timeout=5)
        receiver.close()
    logger.debug("parsed %s in a child process in %.3f s", source, time.monotonic() - started)
    if status != "ok":
        raise LoaderError(payload)
    documents: list[SourceDocument] = payload
    return documents
