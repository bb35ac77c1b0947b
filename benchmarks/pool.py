"""Preprocessing inside a run: threads (default) vs a process pool (``runner.preprocess:
process``), on real pydicom-data images (JPEG 2000 CT/MR/CR/US) and 512² synthetic CT studies,
with studies in flight as the screening flow has them.

    make bench-pool
    .venv/bin/python -m benchmarks.pool [--copies 6] [--synthetic 24] [--workers N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from simulator.samples import REAL_SAMPLES, synthetic_ct
from tasks.core.config import PreprocessConfig, RunnerConfig, StorageConfig
from tasks.imaging.studyimages import prepare_study
from tasks.ingest.discover import Study, discover_studies
from tasks.screening.pool import off_loop, preprocess_pool, shutdown_pools
from tasks.storage import LocalStore, Store

__all__ = ["main"]


def build(root: Path, copies: int, synthetic: int) -> list[tuple[Store, Study]]:
    """One folder (store) per study: real samples copied ``copies`` times, synthetic CTs."""
    from pydicom.data import get_testdata_file

    folders = []
    for name in REAL_SAMPLES:
        src = get_testdata_file(name, download=False)
        if src is None:
            raise FileNotFoundError(f'"{name}" is missing: install the pydicom-data package')
        for i in range(copies):
            folder = root / f"real-{Path(name).stem}-{i}"
            folder.mkdir(parents=True)
            shutil.copyfile(src, folder / name)
            folders.append(folder)
    for i in range(synthetic):
        folder = root / f"synthetic-{i}"
        synthetic_ct(folder / "slice.dcm", lesion=i % 2 == 0, seed=90_000 + i, size=512)
        folders.append(folder)
    items = []
    for folder in folders:
        store = LocalStore(folder)
        (study,) = discover_studies(store).studies
        items.append((store, study))
    return items


async def run(
    items: list[tuple[Store, Study]], runner: RunnerConfig, config: PreprocessConfig
) -> float:
    window = asyncio.Semaphore(64)  # the flow's default max_studies_in_flight
    storage = StorageConfig()

    async def one(store: Store, study: Study) -> int:
        async with window:
            images, errors = await off_loop(runner, storage, prepare_study, [store], study, config)
        if errors or not images:
            raise RuntimeError(f"{study.study_instance_uid}: {[e.reason for e in errors]}")
        return len(images)

    started = time.perf_counter()
    await asyncio.gather(*(one(s, st) for s, st in items))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=6, help="copies of each real sample")
    parser.add_argument("--synthetic", type=int, default=24, help="512² synthetic CT studies")
    parser.add_argument("--workers", type=int, default=None, help="process-pool size (CPUs)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode (best is shown)")
    args = parser.parse_args(argv)
    config = PreprocessConfig()
    with tempfile.TemporaryDirectory(prefix="radflow-bench-pool-") as tmp:
        items = build(Path(tmp), args.copies, args.synthetic)
        workers = args.workers or os.cpu_count() or 1
        print(f"{len(items)} studies, {os.cpu_count()} CPUs, process pool of {workers}")
        started = time.perf_counter()
        pool = preprocess_pool(workers)
        list(pool.map(abs, range(workers * 4)))  # start the workers (spawn: a fresh interpreter)
        print(f"pool start-up: {time.perf_counter() - started:.1f} s (once per process)")
        best = {}
        try:
            for mode in ("thread", "process"):
                runner = RunnerConfig(preprocess=mode, workers=workers)
                times = [asyncio.run(run(items, runner, config)) for _ in range(args.repeat)]
                best[mode] = min(times)
                print(
                    f"{mode:>8}: {best[mode]:6.2f} s  {len(items) / best[mode]:6.1f} studies/s  "
                    f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
                )
        finally:
            shutdown_pools()
    print(f"process pool vs threads: {best['thread'] / best['process']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
