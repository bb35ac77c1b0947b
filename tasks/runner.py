"""How a run uses the machine: the CPU-bound work of a study (preprocessing, the SR and FHIR
reports) in threads or a process pool, shard planning and merging shard summaries (pure
functions; the flows in ``flows/shards.py`` compose them)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tasks.config import RunnerConfig, StorageConfig
from tasks.discover import Study
from tasks.errors import WorkerCrashed
from tasks.schema import RunSummary
from tasks.storage import Store, open_store

__all__ = [
    "merge_summary",
    "plan_shards",
    "POOL_MIN_CPUS",
    "POOL_MIN_STUDIES",
    "off_loop",
    "preprocess_pool",
    "resolve_runner",
    "shutdown_pools",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Fields of a shard's summary that are not added into the parent's: the parent counted its
# studies and skips at discovery, and a kappa is not additive (each shard's summary keeps its own).
_NOT_SUMMED = frozenset({"studies", "skipped", "fleiss_kappa", "kappa_studies"})

_pools: dict[int, ProcessPoolExecutor] = {}

# ``preprocess: auto`` takes the process pool from this many studies to read: a worker spends
# a few seconds importing pydicom, highdicom and the rest before its first study, which a
# small run (an upload event's single study) would wait for, and a large one earns back.
POOL_MIN_STUDIES = 50
POOL_MIN_CPUS = 4


def resolve_runner(runner: RunnerConfig, studies: int) -> RunnerConfig:
    """``runner`` with ``preprocess: auto`` decided for a run that reads ``studies``:
    ``process`` from :data:`POOL_MIN_STUDIES` on a machine with :data:`POOL_MIN_CPUS` CPUs.
    (On 2 CPUs the pool measured slower than threads in bench-screen, 31.7 s vs ~22 s: the
    event loop, the Prefect server and the workers then share two cores.)"""
    if runner.preprocess != "auto":
        return runner
    pool = studies >= POOL_MIN_STUDIES and (os.cpu_count() or 1) >= POOL_MIN_CPUS
    return runner.model_copy(update={"preprocess": "process" if pool else "thread"})


def preprocess_pool(workers: int | None) -> ProcessPoolExecutor:
    """One process pool per size for this process, started with ``spawn`` (forking a process
    that runs an event loop and Prefect's threads is unsafe)."""
    size = workers or os.cpu_count() or 1
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
) -> T:
    """``fn(*stores, *args)`` off the event loop: in a thread, or in the process pool when
    ``runner.preprocess`` is ``process`` (then ``fn`` and ``args`` must pickle; the stores
    are reopened there by URI)."""
    if runner.preprocess != "process":
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


def plan_shards(studies: Sequence[Study], size: int) -> list[list[str]]:
    """Split studies into shards of at most ``size`` studies; each shard is the sorted object
    keys of its studies' instances (what a child run is given, so its parameters stay small)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [
        sorted(inst.ref.key for study in studies[i : i + size] for inst in study.instances)
        for i in range(0, len(studies), size)
    ]


def merge_summary(parent: RunSummary, shard: RunSummary) -> None:
    """Add a shard's counts, costs and review queue into the parent's summary."""
    for name, value in shard:
        if name in _NOT_SUMMED:
            continue
        current = getattr(parent, name)
        if isinstance(value, bool):
            setattr(parent, name, current or value)
        elif isinstance(value, int):
            setattr(parent, name, current + value)
        elif isinstance(value, float):
            setattr(parent, name, round(current + value, 6))
        elif isinstance(value, list):
            current.extend(value)
