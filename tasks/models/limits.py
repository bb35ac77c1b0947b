"""Panel-wide provider limits across processes and machines (``limits: global``): per
configured model a Prefect global concurrency limit ``radflow-model-<name>`` (its
``max_concurrency``) and, when it has ``requests_per_minute``, a rate limit
``radflow-rpm-<name>`` (slots decaying at rpm/60 per second); created or updated from the
config (:func:`sync_limits`, ``radflow limits sync``), checked before a run
(:func:`check_limits`) and taken around every call (:class:`SharedSlots`, :func:`global_rate`)
with ``strict=True``, so a missing limit is one :class:`LimitMissing`, never a silent skip.

Acquiring a slot costs a server round trip or more (``make bench-limits``: ~0.1 s, and one
process's acquisitions of one limit go one at a time), so :class:`SharedSlots` keeps the
slots it took while this process's calls want them: a finished call hands its slot to the next
call of the process (one waiting for the server's too), and a slot goes back to the server when no call took it within
``LINGER_SECONDS`` or it has been held ``HOLD_SECONDS`` (so other processes get their turn)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
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
    "HOLD_SECONDS",
    "LEASE_SECONDS",
    "LINGER_SECONDS",
    "LimitSpec",
    "SharedSlots",
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
LINGER_SECONDS = 0.25  # a slot no call of this process took for this long goes back
HOLD_SECONDS = 10.0  # a slot held this long goes back when its call ends


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
    return LimitMissing(f'global limit "{name}" {reason} (limits: global)')


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


class _Held:
    """One slot of a global concurrency limit, held by a task of its own until released."""

    def __init__(self, model: str) -> None:
        self.since = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._hold(model))

    async def _hold(self, model: str) -> None:
        try:
            async with global_slot(model):
                self.since = time.monotonic()
                self.ready.set_result(None)
                await self._done.wait()
        except asyncio.CancelledError:
            self.ready.cancel()  # dropped while it was still being acquired
            raise
        except Exception as exc:  # noqa: BLE001 — raised to the waiting call, or logged
            if not self.ready.done():
                self.ready.set_exception(exc)  # the call waiting for it raises it
            else:  # e.g. its lease could not be renewed
                logger.warning("a slot of %s was lost while held: %s", slot_name(model), exc)

    async def release(self) -> None:
        """Give the slot back (one not yet acquired is no longer asked for)."""
        if not self.ready.done():
            self._task.cancel()
        self._done.set()
        await asyncio.gather(self._task, return_exceptions=True)


class SharedSlots:
    """This process's slots of model ``model``'s global concurrency limit (see the module
    docstring); never more than the calls it has in flight at once. ``async with
    slots.slot():`` around one call; :meth:`aclose` gives the idle ones back. A call that
    finds no idle slot asks the server for one and takes whichever comes first: the server's,
    or one a call of this process hands over as it ends."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._idle: list[_Held] = []
        self._waiting: list[asyncio.Future[_Held]] = []
        self._releasing: set[asyncio.Task[None]] = set()
        self.acquired = 0  # slots taken from the server (the rest of the calls reused one)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        held = self._idle.pop() if self._idle else await self._take()
        try:
            yield
        finally:
            self._put_back(held)

    async def _take(self) -> _Held:
        handoff: asyncio.Future[_Held] = asyncio.get_running_loop().create_future()
        self._waiting.append(handoff)
        mine = _Held(self.model)
        try:
            await asyncio.wait({handoff, mine.ready}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._drop(handoff, mine)
            raise
        if handoff.done():
            self._drop(None, mine)  # asked for no longer, or idle if it came too
            return handoff.result()
        self._waiting.remove(handoff)
        if mine.ready.cancelled() or mine.ready.exception() is not None:
            self._release(mine)
            mine.ready.result()  # raises: LimitMissing, if the server would not give it
        self.acquired += 1
        return mine

    def _drop(self, handoff: asyncio.Future[_Held] | None, mine: _Held) -> None:
        if handoff is not None:
            if handoff in self._waiting:
                self._waiting.remove(handoff)
            elif handoff.done() and not handoff.cancelled():
                self._put_back(handoff.result())
        if mine.ready.done() and not mine.ready.cancelled() and mine.ready.exception() is None:
            self.acquired += 1
            self._put_back(mine)
        else:
            self._release(mine)

    def _put_back(self, held: _Held) -> None:
        if time.monotonic() - held.since > HOLD_SECONDS:
            self._release(held)
            return
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(held)
                return
        self._idle.append(held)
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._expire, held)

    def _expire(self, held: _Held) -> None:
        if held in self._idle:  # no call took it since
            self._idle.remove(held)
            self._release(held)

    def _release(self, held: _Held) -> None:
        task = asyncio.ensure_future(held.release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(h.release() for h in idle), *self._releasing)
