"""Panel-wide provider limits across processes and machines (``runner.limits: global``): per
configured model a Prefect global concurrency limit ``radflow-model-<name>`` (its
``max_concurrency``) and, when it has ``requests_per_minute``, a rate limit
``radflow-rpm-<name>`` (slots decaying at rpm/60 per second); created or updated from the
config (:func:`sync_limits`, ``radflow limits sync``), checked before a run
(:func:`check_limits`) and taken around every call (:func:`global_slot`, :func:`global_rate`)
with ``strict=True``, so a missing limit is one :class:`LimitMissing`, never a silent skip."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, concurrency, rate_limit
from prefect.exceptions import ObjectNotFound

from tasks.core.config import ModelConfig, Settings
from tasks.core.errors import LimitMissing

__all__ = [
    "LEASE_SECONDS",
    "LimitSpec",
    "check_limits",
    "global_rate",
    "global_slot",
    "limit_specs",
    "rate_name",
    "slot_name",
    "sync_limits",
]

logger = logging.getLogger(__name__)

# A slot's lease, renewed while its call runs; a killed process's slots are free after it
# (the Prefect server's minimum is 60 s).
LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class LimitSpec:
    """One Prefect global concurrency limit as the config wants it."""

    name: str
    limit: int
    slot_decay_per_second: float = 0.0  # above 0: a rate limit


def slot_name(model: str) -> str:
    """The concurrency limit of model ``model`` (its ``max_concurrency`` calls in flight)."""
    return f"radflow-model-{model}"


def rate_name(model: str) -> str:
    """The rate limit of model ``model`` (its ``requests_per_minute`` HTTP requests)."""
    return f"radflow-rpm-{model}"


def _models(settings: Settings) -> Iterator[ModelConfig]:
    """The panel's models and their fallbacks (each fallback has a client of its own)."""
    for cfg in settings.models:
        entry: ModelConfig | None = cfg
        while entry is not None:
            yield entry
            entry = entry.fallback


def limit_specs(settings: Settings) -> list[LimitSpec]:
    """Every limit the config's models need, one per name (a name configured twice keeps
    its first entry). A rate limit's size is one second of requests (at least 1), the burst
    the per-process limiter allows too."""
    specs: dict[str, LimitSpec] = {}
    for cfg in _models(settings):
        specs.setdefault(slot_name(cfg.name), LimitSpec(slot_name(cfg.name), cfg.max_concurrency))
        if cfg.requests_per_minute:
            per_second = cfg.requests_per_minute / 60
            name = rate_name(cfg.name)
            specs.setdefault(name, LimitSpec(name, max(1, math.ceil(per_second)), per_second))
    return list(specs.values())


async def sync_limits(settings: Settings) -> list[LimitSpec]:
    """Create or update every limit of :func:`limit_specs` on the Prefect API (active), and
    return them as the server now holds them."""
    held = []
    async with get_client() as client:
        for spec in limit_specs(settings):
            await client.upsert_global_concurrency_limit_by_name(
                spec.name, spec.limit, spec.slot_decay_per_second
            )
            got = await client.read_global_concurrency_limit_by_name(spec.name)
            if not got.active:  # an inactive limit is not enforced
                await client.update_global_concurrency_limit(
                    spec.name, GlobalConcurrencyLimitUpdate(active=True)
                )
            logger.info("limit %s: %d (decay %g/s)", got.name, got.limit, got.slot_decay_per_second)
            held.append(LimitSpec(got.name, got.limit, got.slot_decay_per_second))
    return held


def _missing(name: str, reason: str) -> LimitMissing:
    return LimitMissing(f'global limit "{name}" {reason} (runner.limits: global)')


async def check_limits(settings: Settings) -> None:
    """Raise :class:`LimitMissing` naming the first limit of the config that the Prefect API
    does not hold, or holds inactive (an inactive limit is not enforced); before any work."""
    async with get_client() as client:
        for spec in limit_specs(settings):
            try:
                got = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                raise _missing(spec.name, "does not exist on the Prefect server") from None
            if not got.active:
                raise _missing(spec.name, "is inactive on the Prefect server")


@asynccontextmanager
async def global_slot(model: str) -> AsyncIterator[None]:
    """Hold one slot of model ``model``'s concurrency limit (leased, renewed while held)."""
    name = slot_name(model)
    try:
        async with concurrency(name, strict=True, lease_duration=LEASE_SECONDS):
            yield
    except ConcurrencySlotAcquisitionError as exc:
        raise _missing(name, f"could not be acquired: {exc}") from None


async def global_rate(model: str) -> None:
    """Take one slot of model ``model``'s rate limit (waits while the minute is spent)."""
    name = rate_name(model)
    try:
        await rate_limit(name, strict=True)
    except ConcurrencySlotAcquisitionError as exc:
        raise _missing(name, f"could not be acquired: {exc}") from None
