"""`radflow serve`: the deployments of deployments/prefect.yaml served in-process (schedules and
event triggers included, no work pool), read from the same YAML as `prefect deploy --all`."""

from __future__ import annotations

import importlib
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from tasks.errors import ConfigError

__all__ = ["DEFAULT_PREFECT_FILE", "load_deployment_specs", "runner_deployments", "serve"]

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


def serve(
    path: str | Path = DEFAULT_PREFECT_FILE,
    only: list[str] | None = None,
    limit: int | None = None,
    poll_seconds: float = 2.0,
) -> None:
    """Serve the deployments until interrupted; runs start in subprocesses of this process.

    ``poll_seconds`` is how often the runner asks the API for runs to start (Prefect's default
    is 10 s, most of the upload-to-report latency of an event-triggered run).
    """
    from prefect import serve as prefect_serve

    deployments = runner_deployments(path, only)
    logger.info("serving %s", ", ".join(d.name for d in deployments))
    prefect_serve(*deployments, limit=limit, query_seconds=poll_seconds)
