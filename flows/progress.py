"""A rich progress bar fed by the screening flow's progress hook (CLI use only)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.screen import progress_hook

T = TypeVar("T")


def run_with_progress(flow_call: Coroutine[Any, Any, T]) -> T:
    """Run an async flow call while showing studies done out of studies to read."""
    with Progress(
        TextColumn("[bold]screening"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        job = bar.add_task("", total=None)

        def update(done: int, total: int, outcome) -> None:
            last = f"last: {outcome.log_id[-24:]}" if outcome else "starting"
            bar.update(job, completed=done, total=total, description=last)

        token = progress_hook.set(update)
        try:
            return asyncio.run(flow_call)
        finally:
            progress_hook.reset(token)
