"""What every ``radflow`` command prints on stderr: one redacted error line and its exit code;
and the console its wide tables go to on stdout."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from tasks.core.redact import redact

__all__ = ["err", "fail", "out_console"]

err = Console(stderr=True)


def fail(exc: Exception, code: int = 2) -> typer.Exit:
    """Print ``exc`` as one line (secrets redacted) and return the Exit to raise."""
    err.print(f"[red]error:[/red] {redact(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def out_console() -> Console:
    """stdout, with every column of a wide table also when it is not a terminal (rich
    assumes 80 columns)."""
    return Console(width=None if sys.stdout.isatty() else 260)
