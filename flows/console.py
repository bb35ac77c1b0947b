"""What every ``radflow`` command prints on stderr: one redacted error line and its exit code."""

from __future__ import annotations

import typer
from rich.console import Console

from tasks.core.redact import redact

__all__ = ["err", "fail"]

err = Console(stderr=True)


def fail(exc: Exception, code: int = 2) -> typer.Exit:
    """Print ``exc`` as one line (secrets redacted) and return the Exit to raise."""
    err.print(f"[red]error:[/red] {redact(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)
