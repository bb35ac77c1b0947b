"""A shard of a large screening run as a run of a deployment on a work pool (``runner.
shard_deployment``): the deployment checked before any shard starts, together with the
automation that marks a shard run Crashed when its heartbeats stop (a worker killed, a node
lost), and each shard's run, re-run when it crashed, whose summary is read back from DEST.

A shard run emits a heartbeat event every :data:`HEARTBEAT_SECONDS` (the parent sets
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in each shard run's job variables, `radflow serve` in its
own environment; Prefect's own default is 180 s); the automation :func:`watch_for_crashes` creates (Prefect's
"detect zombie flows" recipe, restricted to the shard deployment's runs) marks a run Crashed
when ``runner.shard_silence_seconds`` pass without one. The parent then re-runs the shard from
the same manifest: its reported studies are skipped, its answered calls come from the cache
under DEST, and a crashed process's study claims are taken over (claims.py)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import State, StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from tasks.core.config import RunnerConfig
from tasks.core.errors import ConfigError
from tasks.core.schema import RunSummary
from tasks.storage import Store, read_json

__all__ = [
    "HEARTBEAT_ENV",
    "HEARTBEAT_SECONDS",
    "check_deployment",
    "crash_watch",
    "on_deployment",
    "shard_summary",
    "watch_for_crashes",
]

logger = logging.getLogger(__name__)

_ENDED = ("Completed", "Failed", "Cancelled", "Crashed")
HEARTBEAT_SECONDS = 30  # Prefect's minimum
HEARTBEAT_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}


async def check_deployment(runner: RunnerConfig) -> None:
    """Fail before any shard starts when the shard deployment does not exist; make sure its
    crashed runs are detected (:func:`watch_for_crashes`)."""
    name = runner.shard_deployment
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f'runner.shard_deployment "{name}" is not a deployment on {client.api_url}',
                hint="deploy deployments/prefect.yaml (its `shard` deployment is screen/shard) "
                "or run `radflow serve --only shard`",
            ) from None
    await watch_for_crashes(name, deployment.id, runner.shard_silence_seconds)


def crash_watch(name: str, deployment_id: UUID, silence: float) -> AutomationCore:
    """The automation marking a run of deployment ``name`` Crashed once ``silence`` seconds
    pass after a heartbeat with neither another heartbeat nor a final state."""
    return AutomationCore(
        name=f"radflow: crash silent runs of {name}",
        description=(
            f"Marks a run of {name} Crashed when it sent no heartbeat for {silence:g} s "
            "(its worker died): the parent screening run then re-runs the shard. Created by "
            "radflow (tasks/screening/shards.py)."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in _ENDED)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silence:g} s: its worker is gone",
            )
        ],
    )


async def watch_for_crashes(name: str, deployment_id: UUID, silence: float) -> None:
    """Create the automation :func:`crash_watch`, or update it when it differs."""
    wanted = crash_watch(name, deployment_id, silence)
    async with get_client() as client:
        existing = await client.read_automations_by_name(wanted.name)
        if not existing:
            await client.create_automation(wanted)
            logger.info('created the automation "%s"', wanted.name)
            return
        current = AutomationCore.model_validate(existing[0].model_dump())
        if current.model_dump(mode="json") != wanted.model_dump(mode="json"):
            await client.update_automation(existing[0].id, wanted)
            logger.info('updated the automation "%s"', wanted.name)


async def on_deployment(
    name: str, parameters: dict[str, Any], dest: Store, attempts: int
) -> RunSummary:
    """Run the shard on a work pool, up to ``attempts`` times while its run crashes, and
    give the summary its run wrote under DEST (:func:`shard_summary`)."""
    beating = {"env": HEARTBEAT_ENV}  # merged into the deployment's env by the worker
    for attempt in range(1, attempts + 1):
        run = await run_deployment(
            name, parameters=parameters, job_variables=beating, timeout=None, as_subflow=True
        )
        if run.state is None or not run.state.is_crashed() or attempt == attempts:
            break
        logger.warning(
            "shard run %s crashed (%s): running the shard again, attempt %d of %d",
            run.name,
            run.state.message,
            attempt + 1,
            attempts,
        )
    return shard_summary(run.state, run.name, dest)


def shard_summary(state: State | None, name: str, dest: Store) -> RunSummary:
    """The summary a shard's run wrote under DEST (``runs/<flow run id>.json``) when it
    completed, or when it failed after a provider rejected a key or model id (``stopped``:
    the parent stops the whole run); any other end is a ``RuntimeError`` naming the run."""
    ended = state is not None and (state.is_completed() or state.is_failed())
    run_id = state.state_details.flow_run_id if state is not None else None
    data = read_json(dest, f"runs/{run_id}.json") if ended else None
    summary = RunSummary.model_validate(data) if data is not None else None
    if summary is not None and (state.is_completed() or summary.stopped):
        return summary
    if state is not None and state.is_completed():
        raise RuntimeError(f"shard run {name} wrote no runs/{run_id}.json under {dest.uri}")
    message = state.message if state else "no state"
    raise RuntimeError(f"shard run {name} ended {state.name if state else None}: {message}")
