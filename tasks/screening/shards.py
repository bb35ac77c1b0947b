"""A shard of a large screening run as a run of a deployment on a work pool (``runner.
shard_deployment``): the deployment checked before any shard starts, and each shard's run,
whose summary is read back from DEST."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from tasks.core.errors import ConfigError
from tasks.core.schema import RunSummary
from tasks.storage import Store, read_json

__all__ = ["check_deployment", "on_deployment"]

logger = logging.getLogger(__name__)


async def check_deployment(name: str) -> None:
    """Fail before any shard starts when the shard deployment does not exist."""
    async with get_client() as client:
        try:
            await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f'runner.shard_deployment "{name}" is not a deployment on {client.api_url}',
                hint="deploy deployments/prefect.yaml (its `shard` deployment is screen/shard) "
                "or run `radflow serve --only shard`",
            ) from None


async def on_deployment(name: str, parameters: dict[str, Any], dest: Store) -> RunSummary:
    """Run the shard on a work pool and read the summary its run wrote under DEST."""
    run = await run_deployment(name, parameters=parameters, timeout=None, as_subflow=True)
    if run.state is None or not run.state.is_completed():
        message = run.state.message if run.state else "no state"
        raise RuntimeError(f"shard run {run.name} ended {run.state_name}: {message}")
    data = read_json(dest, f"runs/{run.id}.json")
    if data is None:
        raise RuntimeError(f"shard run {run.name} wrote no runs/{run.id}.json under {dest.uri}")
    return RunSummary.model_validate(data)
