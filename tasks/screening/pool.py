"""How a run uses the machine: the CPU-bound work of a study (preprocessing, the SR and FHIR
reports) in threads or a process pool. Pool workers import this module: it imports neither
Prefect nor a model SDK."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tasks.core.config import RunnerConfig, StorageConfig
from tasks.core.errors import WorkerCrashed
from tasks.storage import Store, open_store

__all__ = [
    "POOL_MIN_CPUS",
    "POOL_MIN_STUDIES",
    "off_loop",
    "pool_size",
    "preprocess_pool",
    "resolve_runner",
    "shutdown_pools",
    "warm",
    "warm_pool",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_pools: dict[int, ProcessPoolExecutor] = {}
_starting: set[int] = set()  # pool sizes whose processes warm_pool is still starting

# ``preprocess: auto`` takes the process pool from this many studies to read: a worker spends
# a few seconds importing pydicom, highdicom and the rest before its first study, which a
# small run (an upload event's single study) would wait for, and a large one earns back.
POOL_MIN_STUDIES = 50
POOL_MIN_CPUS = 2


def resolve_runner(runner: RunnerConfig, studies: int) -> RunnerConfig:
    """``runner`` with ``preprocess: auto`` decided for a run that reads ``studies``:
    ``process`` from :data:`POOL_MIN_STUDIES` on a machine with :data:`POOL_MIN_CPUS` CPUs.
    The pool has one process per CPU: on 2 CPUs, bench-screen measured 10.4 s with two
    workers, 12.4 s with one and ~20 s in threads (200 studies, SR and FHIR reports
    included; the event loop waits on the models most of the time)."""
    if runner.preprocess != "auto":
        return runner
    pool = studies >= POOL_MIN_STUDIES and (os.cpu_count() or 1) >= POOL_MIN_CPUS
    return runner.model_copy(update={"preprocess": "process" if pool else "thread"})


def pool_size(workers: int | None) -> int:
    return workers or os.cpu_count() or 1


def _warm() -> None:
    """In a pool process: import what its jobs use and load highdicom's tables."""
    import tasks.imaging.studyimages  # noqa: F401  (prepare_study's module)
    import tasks.reports.write  # noqa: F401  (publish_report's module)
    from tasks.reports.sr import warm_up

    warm_up()


async def warm_pool(runner: RunnerConfig) -> None:
    """Start the pool's processes and let each load what its jobs need (a second or two),
    overlapping a run's first model calls. Meanwhile :func:`off_loop` uses threads, so the
    first studies do not wait for the pool."""
    size = pool_size(runner.workers)
    pool = preprocess_pool(runner.workers)
    loop = asyncio.get_running_loop()
    _starting.add(size)
    try:
        await asyncio.gather(*(loop.run_in_executor(pool, _warm) for _ in range(size)))
    finally:
        _starting.discard(size)


async def warm(runner: RunnerConfig) -> None:
    """Load, while a run's first models read, what its first reports would otherwise load on
    the clock: the pool's processes (:func:`warm_pool`), or highdicom's tables in this one."""
    if runner.preprocess == "process":
        await warm_pool(runner)
    else:
        from tasks.reports.sr import warm_up

        await asyncio.to_thread(warm_up)


def preprocess_pool(workers: int | None) -> ProcessPoolExecutor:
    """One process pool per size for this process (``workers``, or one per CPU),
    started with ``spawn`` (forking a process that runs an event loop and Prefect's threads
    is unsafe)."""
    size = pool_size(workers)
    pool = _pools.get(size)
    if pool is None:
        pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
        _pools[size] = pool
        logger.info("started a preprocessing pool of %d processes", size)
    return pool


def shutdown_pools() -> None:
    """Stop the worker processes (at the end of a run; the next run starts new ones)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


_worker_stores: dict[tuple[str, str], Store] = {}


def _worker_store(uri: str, storage: StorageConfig) -> Store:
    key = (uri, storage.model_dump_json())
    store = _worker_stores.get(key)
    if store is None:
        store = _worker_stores[key] = open_store(uri, storage)
    return store


def _in_worker(fn: Callable[..., T], uris: Sequence[str], storage: StorageConfig, *args: Any) -> T:
    """Runs in a pool process: reopen the stores by URI (clients do not pickle), then call."""
    return fn(*(_worker_store(uri, storage) for uri in uris), *args)


async def off_loop(
    runner: RunnerConfig,
    storage: StorageConfig,
    fn: Callable[..., T],
    stores: Sequence[Store],
    *args: Any,
    queue: bool = False,
) -> T:
    """``fn(*stores, *args)`` off the event loop: in a thread, or in the process pool when
    ``runner.preprocess`` is ``process`` (then ``fn`` and ``args`` must pickle; the stores
    are reopened there by URI). While :func:`warm_pool` starts the pool, in a thread, unless
    ``queue``: then it waits for a pool process. Work that the model calls wait for (the key
    images) takes a thread; work after them (the reports, whose SR holds the GIL for tens of
    milliseconds) queues, so that it never runs in the event loop's process."""
    starting = pool_size(runner.workers) in _starting
    if runner.preprocess != "process" or (starting and not queue):
        return await asyncio.to_thread(fn, *stores, *args)
    pool = preprocess_pool(runner.workers)
    loop = asyncio.get_running_loop()
    uris = [store.uri for store in stores]
    try:
        return await loop.run_in_executor(pool, _in_worker, fn, uris, storage, *args)
    except BrokenProcessPool as exc:
        for size, broken in list(_pools.items()):  # the next call starts a new pool
            if broken is pool:
                del _pools[size]
        raise WorkerCrashed(f"{getattr(fn, '__name__', fn)} lost its pool process: {exc}") from None
