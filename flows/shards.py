"""Sharded screening: a large run's pending studies become child flow runs of N studies each,
as subflows in this process or as runs of a deployment on a work pool (``run_deployment``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from prefect import Flow, get_client, get_run_logger
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from tasks.core.config import RunnerConfig
from tasks.core.errors import ConfigError
from tasks.core.schema import RunSummary
from tasks.ingest.discover import Study
from tasks.screening.pool import merge_summary, plan_shards
from tasks.storage import Store, read_json

__all__ = ["run_shards"]

ProgressHook = Callable[[int, int, Any], None]


async def _on_deployment(name: str, parameters: dict[str, Any], dest: Store) -> RunSummary:
    """Run the shard on a work pool and read the summary its run wrote under DEST."""
    run = await run_deployment(name, parameters=parameters, timeout=None, as_subflow=True)
    if run.state is None or not run.state.is_completed():
        message = run.state.message if run.state else "no state"
        raise RuntimeError(f"shard run {run.name} ended {run.state_name}: {message}")
    data = read_json(dest, f"runs/{run.id}.json")
    if data is None:
        raise RuntimeError(f"shard run {run.name} wrote no runs/{run.id}.json under {dest.uri}")
    return RunSummary.model_validate(data)


async def _check_deployment(name: str) -> None:
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


async def run_shards(
    screen_flow: Flow,
    pending: Sequence[Study],
    *,
    source: str,
    out: str,
    config: str | None,
    force: bool,
    runner: RunnerConfig,
    dest: Store,
    summary: RunSummary,
    progress: ContextVar[ProgressHook | None],
    on_failure: Callable[[Study, str], int],
) -> list[str]:
    """Screen ``pending`` as shards of ``runner.shard_size`` studies, ``runner.shards_in_flight``
    at a time; each shard is a child run of ``screen_flow`` given its studies' object keys.

    Shard summaries are merged into ``summary``. A shard that fails turns each of its studies
    without a report into error records (``on_failure`` writes them and returns how many, 0 for
    a study that is reported). ``progress`` is the CLI's progress hook: the children's calls
    are re-counted over the whole run. Returns the child flow run ids.
    """
    logger = get_run_logger()
    if runner.shard_deployment:
        await _check_deployment(runner.shard_deployment)
    hook = progress.get()
    shards = plan_shards(pending, runner.shard_size)
    by_key = {ref.key: study for study in pending for ref in study.objects}
    gate = asyncio.Semaphore(runner.shards_in_flight)
    done = 0
    total = len(pending)
    child_ids: list[str] = []

    def count(_done: int, _total: int, outcome: Any) -> None:
        """The children's progress, re-counted over the whole run for the parent's hook."""
        nonlocal done
        if outcome is not None and hook:
            done += 1
            hook(done, total, outcome)

    async def one(index: int, keys: list[str]) -> None:
        parameters = {"source": source, "out": out, "config": config, "force": force}
        parameters["keys"] = keys
        async with gate:
            logger.info("shard %d/%d: %d objects", index + 1, len(shards), len(keys))
            try:
                if runner.shard_deployment:
                    child = await _on_deployment(runner.shard_deployment, parameters, dest)
                else:
                    name = f"screen-shard-{index + 1:04d}-of-{len(shards):04d}"
                    child = await screen_flow.with_options(flow_run_name=name)(**parameters)
            except Exception as exc:  # noqa: BLE001 — a failed shard becomes error records
                reason = f"shard {index + 1}/{len(shards)} failed: {exc}"
                logger.error("%s", reason)
                studies = {by_key[k].study_instance_uid: by_key[k] for k in keys}
                for study in studies.values():
                    records = on_failure(study, reason)
                    summary.errors += records
                    summary.reported += records == 0
                return
        merge_summary(summary, child)
        child_ids.append(child.run_id)

    token = progress.set(count if hook else None)
    try:
        await asyncio.gather(*(one(i, keys) for i, keys in enumerate(shards)))
    finally:
        progress.reset(token)
    return child_ids
