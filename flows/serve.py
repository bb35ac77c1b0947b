"""`radflow serve`: the deployments of deployments/prefect.yaml served in-process (schedules and
event triggers included, no work pool), read from the same YAML as `prefect deploy --all`.

Prefect's runner starts each flow run in a new interpreter, which spends seconds importing
prefect, both model SDKs, pydicom and highdicom before the run begins. The event-triggered
deployments (on-upload: latency matters) are therefore run *warm* by default: their flow runs
execute in this process, where that code is already imported."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import TypeAdapter, ValidationError

from tasks.core.errors import ConfigError

__all__ = [
    "DEFAULT_PREFECT_FILE",
    "load_deployment_specs",
    "runner_deployments",
    "serve",
    "serve_warm",
]

logger = logging.getLogger("radflow.serve")

DEFAULT_PREFECT_FILE = Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"
_SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "anchor_date", "day_or", "active"}
_SCHEDULE_KEYS |= {"parameters", "slug"}


def load_deployment_specs(path: str | Path = DEFAULT_PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` of a prefect.yaml, anchors and merge keys expanded."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f'cannot read deployments file "{path}": {exc}') from None
    specs = (doc or {}).get("deployments")
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f'"{path}" has no `deployments` list')
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not spec.get("name") or not spec.get("entrypoint"):
            raise ConfigError(f'"{path}": deployment {i} needs a `name` and an `entrypoint`')
    return specs


def _load_flow(entrypoint: str) -> Any:
    """``flows/screen.py:screen`` → the flow object, imported as the module ``flows.screen``
    (so runs started by the runner import the installed package, whatever the directory)."""
    file, _, name = entrypoint.partition(":")
    module = file.removesuffix(".py").replace("/", ".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f'entrypoint "{entrypoint}" cannot be loaded: {exc}') from None


def _schedule(spec: dict[str, Any], where: str) -> Any:
    from prefect.schedules import Schedule

    unknown = set(spec) - _SCHEDULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown schedule keys {sorted(unknown)}")
    spec = dict(spec)
    if isinstance(spec.get("interval"), int | float):
        spec["interval"] = timedelta(seconds=spec["interval"])
    return Schedule(**spec)


def _concurrency(value: Any) -> Any:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    return ConcurrencyLimitConfig(**value) if isinstance(value, dict) else value


def runner_deployments(
    path: str | Path = DEFAULT_PREFECT_FILE, only: list[str] | None = None
) -> list[Any]:
    """``RunnerDeployment`` objects for the deployments of ``path`` (all, or those named in
    ``only``), with their schedules, triggers, parameters, tags and concurrency limits."""
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentTriggerTypes

    specs = load_deployment_specs(path)
    names = [s["name"] for s in specs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"no deployment named {unknown} in {path} (there are: {names})")
    triggers = TypeAdapter(DeploymentTriggerTypes)
    out = []
    for spec in specs:
        if only and spec["name"] not in only:
            continue
        where = f'{path}: deployment "{spec["name"]}"'
        try:
            trigger_list = [
                triggers.validate_python({"name": f"{spec['name']}__trigger_{i}", **t})
                for i, t in enumerate(spec.get("triggers") or [], 1)
            ]
        except ValidationError as exc:
            raise ConfigError(f"{where}: bad trigger: {exc.errors()[0]['msg']}") from None
        flow = _load_flow(spec["entrypoint"])
        out.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                version=spec.get("version"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=[_schedule(s, where) for s in spec.get("schedules") or []],
                triggers=trigger_list,
                concurrency_limit=_concurrency(spec.get("concurrency_limit")),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


async def serve_warm(deployments: list[Any], poll_seconds: float, limit: int | None) -> None:
    """Register ``deployments`` (triggers included) and execute their flow runs in this
    process: every ``poll_seconds``, claim the scheduled runs (the server accepts one
    Scheduled → Pending transition, so no run starts twice; a deployment concurrency limit
    answers with a later Scheduled state instead) and run each as an asyncio task, at most
    ``limit`` at once (the rest stay Scheduled). A run that fails ends Failed on the server
    like any other; cancelling a warm run from the UI is not supported (it runs to its end)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import Abort, PrefectHTTPStatusError
    from prefect.flow_engine import run_flow
    from prefect.states import Pending
    from prefect.utilities.engine import propose_state

    from tasks.reports.sr import warm_up
    from tasks.screening.study import MODELS_MODULE

    await asyncio.to_thread(warm_up)  # what a run's first report would load, loaded now
    await asyncio.to_thread(importlib.import_module, MODELS_MODULE)  # and its model SDKs
    flows = {}  # deployment id → flow object (already imported by runner_deployments)
    for deployment in deployments:
        module, _, name = deployment.entrypoint.rpartition(".")
        flows[await deployment.apply()] = getattr(importlib.import_module(module), name)
    running: set[asyncio.Task] = set()

    async def execute(run: Any) -> None:
        logger.info("flow run %s (%s) starts in this process", run.name, run.id)
        state = await run_flow(flows[run.deployment_id], flow_run=run, return_type="state")
        logger.info("flow run %s (%s) ended %s", run.name, run.id, state.type.value)

    def finished(task: asyncio.Task) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a warm flow run raised outside its engine", exc_info=task.exception())

    async with get_client() as client:
        while True:
            try:
                due = await client.get_scheduled_flow_runs_for_deployments(
                    deployment_ids=list(flows), scheduled_before=datetime.now(UTC)
                )
            except (httpx.HTTPError, PrefectHTTPStatusError) as exc:  # server restarting
                logger.warning("cannot read scheduled runs (%s); retrying", exc)
                due = []
            for run in due:
                if limit and len(running) >= limit:
                    break  # the rest stay Scheduled until a run ends
                try:
                    state = await propose_state(client, Pending(), flow_run_id=run.id)
                except Abort as exc:  # not ours to start (already taken, or cancelled)
                    logger.info("flow run %s not started: %s", run.id, exc)
                    continue
                if state.is_pending():
                    task = asyncio.create_task(execute(run))
                    running.add(task)
                    task.add_done_callback(finished)
            await asyncio.sleep(poll_seconds)


def serve(
    path: str | Path = DEFAULT_PREFECT_FILE,
    only: list[str] | None = None,
    limit: int | None = None,
    poll_seconds: float = 2.0,
    warm: bool = True,
) -> None:
    """Serve the deployments until interrupted: event-triggered ones warm (``warm``, see the
    module docstring), the others by Prefect's runner (each run in a subprocess).

    ``poll_seconds`` is how often to ask the API for runs to start (Prefect's default is 10 s,
    most of the upload-to-report latency of an event-triggered run).
    """
    from prefect import aserve

    deployments = runner_deployments(path, only)
    hot = [d for d in deployments if warm and d.triggers]
    cold = [d for d in deployments if d not in hot]
    for label, group in (("in this process", hot), ("in subprocesses", cold)):
        if group:
            logger.info("serving %s: runs %s", ", ".join(d.name for d in group), label)

    async def both() -> None:
        # Prefect's runner stops on SIGTERM (its own handler); the warm loop stops with it
        jobs = [asyncio.create_task(serve_warm(hot, poll_seconds, limit))] if hot else []
        if cold:
            jobs.append(asyncio.create_task(aserve(*cold, limit=limit, query_seconds=poll_seconds)))
        done, running = await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
        for job in running:
            job.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for job in done:
            job.result()  # its exception, if it failed

    if not cold:  # no runner to take SIGTERM (docker stop, kubectl delete): exit cleanly
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(both())
