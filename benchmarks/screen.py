"""Throughput benchmark: the screening flow vs a plain-asyncio loop (discover, preprocess, the
same SDK calls through the same Panel with the same limits; no Prefect, no reports), both
against one simulator process; prints the ratio (target >= 0.9). It also times the model
calls alone (images prepared beforehand): the model layer's own bound; and the flow's own
per-study work (``screen_study``: the same pool, reports, SR and FHIR, and the run's kappa)
in plain asyncio, so that flow / that = what Prefect's orchestration costs.

    make bench-screen
    .venv/bin/python -m benchmarks.screen [--studies 200] [--latency 1] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from simulator.process import panel_config, running_simulator
from simulator.samples import build_sample_folder

__all__ = ["baseline", "main"]

KEY_ENV = "RADFLOW_BENCH_KEY"


def _config(sim, folder: Path, concurrency: int) -> Path:
    models = panel_config(sim.url, KEY_ENV, max_concurrency=concurrency)
    path = folder / "radflow.yaml"
    path.write_text(yaml.safe_dump({"language": "en", "models": models}))
    return path


async def baseline(source: str, config: Path, calls_only: bool = False) -> tuple[int, int, float]:
    """discover → per study (bounded like the flow): preprocess in a thread, then the panel;
    returns (studies, readings that succeeded, seconds). With ``calls_only`` every study is
    preprocessed first and only the model calls are timed (the model layer's own bound)."""
    from tasks.core.config import load_settings
    from tasks.imaging.studyimages import prepare_study
    from tasks.ingest.discover import discover_studies
    from tasks.models.panel import Panel, load_prompt
    from tasks.storage import open_store

    settings = load_settings(config)
    src = open_store(source)
    inventory = await asyncio.to_thread(discover_studies, src)
    panel, prompt = Panel(settings), load_prompt(settings.language)
    window = asyncio.Semaphore(settings.max_studies_in_flight)

    def prepare(study) -> dict[str, list[bytes]]:
        prepared, _ = prepare_study(src, study, settings.preprocess, panel.providers)
        return {p: [img.for_provider(p) for _, img in prepared] for p in panel.providers}

    ready = [prepare(s) for s in inventory.studies] if calls_only else []
    start = time.perf_counter()

    async def one(i: int, study) -> int:
        async with window:
            sized = ready[i] if calls_only else await asyncio.to_thread(prepare, study)
            readings = await panel.read(sized, {"modality": "CT"}, prompt)
            return sum(r.ok for r in readings)

    try:
        ok = await asyncio.gather(*(one(i, s) for i, s in enumerate(inventory.studies)))
    finally:
        await panel.aclose()
    seconds = time.perf_counter() - start if calls_only else 0.0
    return len(inventory.studies), sum(ok), seconds


async def same_work(source: str, dest: str, config: Path) -> tuple[int, int]:
    """The flow's work without Prefect: discovery, ``screen_study`` for every study under the
    same window and the same threads or process pool (warmed the same way), the run's kappa.
    Returns (studies reported, readings that succeeded)."""
    from tasks.consensus.vote import KAPPA_MODULE, panel_kappa
    from tasks.core.config import load_settings
    from tasks.ingest.discover import discover_studies
    from tasks.screening.pool import resolve_runner, shutdown_pools, warm
    from tasks.screening.study import Screening, screen_study
    from tasks.storage import open_store

    settings = load_settings(config)
    src, out = open_store(source), open_store(dest)
    inventory = await asyncio.to_thread(discover_studies, src)
    runner = resolve_runner(settings.runner, len(inventory.studies))
    settings = settings.model_copy(update={"runner": runner})
    # loaded in the background as the flow does: the pool or highdicom's tables, statsmodels
    kappa = asyncio.to_thread(importlib.import_module, KAPPA_MODULE)
    warming = asyncio.ensure_future(asyncio.gather(warm(runner), kappa))
    run = await Screening.start(src, out, settings)

    async def one(study):
        async with run.window:
            return await screen_study(study, run)

    try:
        outcomes = await asyncio.gather(*(one(s) for s in inventory.studies))
        await warming
    finally:
        await run.panel.aclose()
        shutdown_pools()  # the flow starts its own, as a run would
    reports = [o.report for o in outcomes if o.report is not None]
    panel_kappa([[r.abnormal if r.ok else None for r in rep.readings] for rep in reports])
    return len(reports), sum(r.ok for rep in reports for r in rep.readings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "bench-key")

    from prefect.testing.utilities import prefect_test_harness

    from flows.screen import screen

    with tempfile.TemporaryDirectory(prefix="radflow-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_sample_folder(root / "studies", synthetic=args.studies, real=False, junk=False)
        build_sample_folder(root / "warmup", synthetic=1, real=False, junk=False)
        print(f"{args.studies} synthetic studies built in {time.perf_counter() - t0:.1f} s")
        with (
            running_simulator("--latency", str(args.latency), "--seed", "0") as sim,
            prefect_test_harness(server_startup_timeout=180),  # a real API, temp database
        ):
            config = _config(sim, root, args.concurrency)
            # start the Prefect API and import everything once, outside the measurement
            t0 = time.perf_counter()
            asyncio.run(screen(str(root / "warmup"), str(root / "warmup-out"), str(config)))
            print(f"warm-up flow run (Prefect API start-up) {time.perf_counter() - t0:.1f} s")

            n, ok, calls_only = asyncio.run(baseline(str(root / "studies"), config, True))
            print(f"model calls only (images ready): {n} studies, {ok} ok in {calls_only:.2f} s")

            before = sum(sim.stats()["requests"].values())
            t0 = time.perf_counter()
            n, ok, _ = asyncio.run(baseline(str(root / "studies"), config))
            plain = time.perf_counter() - t0
            calls = sum(sim.stats()["requests"].values()) - before
            print(f"plain asyncio: {n} studies, {ok} readings ok, {calls} calls in {plain:.2f} s")

            t0 = time.perf_counter()
            n, ok = asyncio.run(same_work(str(root / "studies"), str(root / "same"), config))
            same = time.perf_counter() - t0
            print(f"same work, plain asyncio: {n} studies reported, {ok} readings in {same:.2f} s")

            before = sum(sim.stats()["requests"].values())
            t0 = time.perf_counter()
            summary = asyncio.run(screen(str(root / "studies"), str(root / "out"), str(config)))
            flow = time.perf_counter() - t0
            calls = sum(sim.stats()["requests"].values()) - before
            stats = sim.stats()
            print(
                f"prefect flow:  {summary.reported} studies reported, {summary.model_calls} "
                f"readings, {calls} calls in {flow:.2f} s"
            )
            print(f"peak in flight per model: {stats['peak_in_flight']}")
    print(f"throughput ratio flow/plain = {plain / flow:.2f}x (target >= 0.90x)")
    print(f"orchestration: flow/same work in plain asyncio = {same / flow:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
