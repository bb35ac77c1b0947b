"""`radflow limits sync [--config FILE]`: create or update, on the Prefect server, the global
concurrency and rate limits the config's models need with ``limits: global``
(tasks/models/limits.py), and print them."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from flows.console import fail
from tasks.core.config import Settings
from tasks.core.errors import ConfigError, RadflowError

__all__ = ["limits", "sync_from_config"]

logger = logging.getLogger(__name__)

limits = typer.Typer(
    help="Prefect global limits of the models (limits: global).", no_args_is_help=True
)


def sync_from_config(settings: Settings) -> Table:
    """Create or update the limits of ``settings`` on the Prefect API (``PREFECT_API_URL``,
    which must be set: an ephemeral API's limits would bind no other process); their table."""
    from prefect.settings import PREFECT_API_URL

    from tasks.models.limits import sync_limits

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: global limits live on the Prefect server every "
            "worker uses",
            hint="export PREFECT_API_URL=http://<server>:4200/api (or use a Prefect profile)",
        )
    try:
        held = asyncio.run(sync_limits(settings))
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot create the limits at {url}: {exc}") from None
    table = Table("limit", "slots", "decay /s", "kind", title=f"Prefect global limits at {url}")
    for spec in held:
        kind = "requests per minute" if spec.slot_decay_per_second else "calls in flight"
        table.add_row(spec.name, str(spec.limit), f"{spec.slot_decay_per_second:g}", kind)
    return table


@limits.command("sync")
def sync(
    config: Annotated[Path | None, typer.Option(help="YAML settings file")] = None,
) -> None:
    """Create or update every model's limits from the config, and print them."""
    from tasks.core.config import load_settings

    try:
        table = sync_from_config(load_settings(config))
    except RadflowError as exc:
        raise fail(exc) from None
    Console().print(table)
