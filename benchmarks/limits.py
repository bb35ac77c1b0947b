"""What one model call pays for ``limits: global``: acquiring and releasing a slot of a
Prefect global concurrency limit (``radflow-model-<name>``, leased) and taking a slot of a rate
limit (``radflow-rpm-<name>``), against a real Prefect API (the test harness: a server on
loopback with SQLite), one after the other and with callers in flight at once; and the same
calls through radflow's ``SharedSlots``, which keeps a process's slots while its calls want
them (what a run uses).

    make bench-limits
    .venv/bin/python -m benchmarks.limits [--calls 200] [--parallel 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from tasks.core.config import Settings

__all__ = ["main"]


def _settings(parallel: int) -> Settings:
    model = {"name": "bench", "provider": "openai", "model": "gpt-4o", "api_key_env": "UNUSED",
             "max_concurrency": parallel, "requests_per_minute": 100_000}  # fmt: skip
    return Settings.model_validate({"models": [model], "runner": {"limits": "global"}})


async def _timed(calls: int, one) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await one()
        out.append((time.perf_counter() - started) * 1e3)
    return out


async def _measure(calls: int, parallel: int) -> dict[str, list[float]]:
    from tasks.models.limits import (
        SharedSlots,
        check_limits,
        global_rate,
        global_slot,
        sync_limits,
    )

    settings = _settings(parallel)
    await sync_limits(settings)
    await check_limits(settings)

    async def slot() -> None:
        async with global_slot("bench"):
            pass

    async def rate() -> None:
        await global_rate("bench")

    await _timed(10, slot)  # warm: the client, the acquisition service's thread
    results = {"slot": await _timed(calls, slot), "rate": await _timed(calls, rate)}
    shared = SharedSlots("bench")

    async def reused() -> None:
        async with shared.slot():
            await asyncio.sleep(0)

    results["shared"] = await _timed(calls, reused)
    per_task = max(1, calls // parallel)
    for what, one in (("parallel", slot), ("shared_parallel", reused)):
        started = time.perf_counter()
        await asyncio.gather(*(_timed(per_task, one) for _ in range(parallel)))
        results[what] = [(time.perf_counter() - started) * 1e3 / (per_task * parallel)]
    results["acquired"] = [shared.acquired]
    await shared.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        results = asyncio.run(_measure(args.calls, args.parallel))
    for what, label in (("slot", "concurrency slot, acquire + release"),
                        ("rate", "rate-limit slot"),
        ("shared", "SharedSlots, one call after another")):  # fmt: skip
        ms = sorted(results[what])
        p95 = ms[int(0.95 * (len(ms) - 1))]
        print(f"{label}: median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms, "
              f"max {ms[-1]:.1f} ms over {len(ms)} calls")  # fmt: skip
    print(
        f"{args.parallel} callers at once: {results['parallel'][0]:.1f} ms wall per "
        f"acquire + release; through SharedSlots {results['shared_parallel'][0]:.2f} ms "
        f"({results['acquired'][0]} slots taken from the server for all its calls)"
    )


if __name__ == "__main__":
    main()
