"""The decoding memory budget (tasks/imaging/budget.py): admission in order, an object larger than the
budget alone, cancellation, waiters on other event loops, what a study is charged; and end
to end, the peak RSS of `radflow screen` with and without it, in threads and in the pool."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from simulator.hostile import large_rle
from simulator.samples import synthetic_ct
from tasks.core.config import PreprocessConfig, RunnerConfig
from tasks.imaging.budget import DECODE_FACTOR, DecodeBudget, decode_claim, default_budget_bytes
from tasks.imaging.preprocess import MAX_FRAME_BYTES
from tasks.ingest.discover import Instance, Study
from tasks.storage import ObjectRef
from tests.helpers import RADFLOW, ROOT, child_env, read_reports, sim_config


async def _holder(budget: DecodeBudget, nbytes: int, log: list, release: asyncio.Event) -> None:
    async with budget.hold(nbytes):
        log.append((nbytes, budget.held))
        await release.wait()


async def _settle() -> None:
    """Let every ready task run (admissions are callbacks on the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_studies_wait_for_room_and_are_admitted_first_come_first():
    async def main() -> None:
        budget, log = DecodeBudget(100), []
        gates = [asyncio.Event() for _ in range(3)]
        tasks = [
            asyncio.create_task(_holder(budget, n, log, gate))
            for n, gate in zip((60, 60, 30), gates, strict=True)
        ]
        await _settle()
        # 30 would fit beside the first 60, but it asked after the second: it waits its turn
        assert log == [(60, 60)] and budget.held == 60 and budget.waiting == 2
        gates[0].set()
        await _settle()
        assert log == [(60, 60), (60, 90), (30, 90)] and budget.held == 90
        gates[1].set(), gates[2].set()
        await asyncio.gather(*tasks)
        assert budget.held == 0

    asyncio.run(main())


def test_a_claim_larger_than_the_budget_runs_alone_rather_than_never():
    async def main() -> None:
        budget, log = DecodeBudget(100), []
        small, large = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_holder(budget, 10, log, small))
        await _settle()
        second = asyncio.create_task(_holder(budget, 250, log, large))
        await _settle()
        assert log == [(10, 10)]  # waits while anything else is held …
        small.set()
        await _settle()
        assert log == [(10, 10), (250, 250)]  # … then runs alone
        large.set()
        await asyncio.gather(first, second)
        assert budget.held == 0

    asyncio.run(main())


def test_a_cancelled_waiter_gives_up_its_turn_and_holds_nothing():
    async def main() -> None:
        budget, log = DecodeBudget(100), []
        gates = [asyncio.Event() for _ in range(3)]
        a = asyncio.create_task(_holder(budget, 80, log, gates[0]))
        await _settle()
        b = asyncio.create_task(_holder(budget, 80, log, gates[1]))
        c = asyncio.create_task(_holder(budget, 20, log, gates[2]))
        await _settle()
        b.cancel()  # the head of the queue leaves: the one behind it fits now
        await _settle()
        assert log == [(80, 80), (20, 100)] and budget.held == 100
        with pytest.raises(asyncio.CancelledError):
            await b
        gates[0].set(), gates[2].set()
        await asyncio.gather(a, c)
        assert budget.held == 0

    asyncio.run(main())


def test_waiters_on_other_event_loops_are_admitted_when_room_is_made():
    """Two runs of one process (a serve process, in-process shards) share the budget."""
    budget, order = DecodeBudget(100), []

    async def other_run() -> None:
        async with budget.hold(100):
            order.append("other run decodes")

    async def main() -> None:
        async with budget.hold(100):
            thread = threading.Thread(target=asyncio.run, args=(other_run(),))
            thread.start()
            while budget.waiting == 0:  # the other loop's study has asked and waits
                await asyncio.sleep(0.01)
            order.append("this run releases")
        await asyncio.to_thread(thread.join, 10)

    asyncio.run(main())
    assert order == ["this run releases", "other run decodes"] and budget.held == 0


def _instance(
    key: str, size: int, frame_bytes: int, frames: int = 1, syntax: str = JPEG2000Lossless
) -> Instance:
    ref = ObjectRef(f"/in/{key}", key, size, "1")
    return Instance(ref, "1.2", "1.2.3", f"1.2.3.{key}", "CT", 1, frames, {}, frame_bytes, syntax)


def test_a_study_is_charged_its_largest_instance_from_the_headers():
    mib = 2**20
    study = Study(
        "1.2",
        [
            _instance("a", 4 * mib, 256 * mib),  # 256 MiB decoded from a 4 MiB file
            _instance("b", 1 * mib, 1 * mib, frames=100),  # multi-frame: the frames shown
            _instance("c", 1 * mib, MAX_FRAME_BYTES + 1),  # refused before decoding
        ],
    )
    assert decode_claim(study, PreprocessConfig()) == 4 * mib + DECODE_FACTOR * 256 * mib
    multi = Study("1.3", [study.instances[1]])
    assert decode_claim(multi, PreprocessConfig()) == 1 * mib + DECODE_FACTOR * 1 * mib
    spaced = PreprocessConfig(key_images="spaced:4")
    assert decode_claim(multi, spaced) == 1 * mib + DECODE_FACTOR * 4 * mib
    montage = PreprocessConfig(key_images="montage:2x2")  # and the series' 8-bit tiles
    assert decode_claim(study, montage) == 4 * mib + DECODE_FACTOR * 256 * mib + 4 * 256 * mib
    # native and RLE frames cost their decoded size twice (measured), other syntaxes more
    rle = Study("1.4", [_instance("d", 4 * mib, 256 * mib, syntax=RLELossless)])
    assert decode_claim(rle, PreprocessConfig()) == 4 * mib + 2 * 256 * mib
    native = Study("1.5", [_instance("e", 256 * mib, 256 * mib, syntax=ExplicitVRLittleEndian)])
    assert decode_claim(native, PreprocessConfig()) == 256 * mib + 2 * 256 * mib


def test_the_default_budget_is_a_quarter_of_memory_at_most_8_gib():
    from tasks.imaging.budget import decode_budget, memory_bytes

    assert default_budget_bytes() == min(memory_bytes() // 4, 8 * 2**30)
    assert decode_budget(RunnerConfig()).limit == default_budget_bytes()
    assert decode_budget(RunnerConfig(decode_memory_mib=600)).limit == 600 * 2**20
    assert decode_budget(RunnerConfig(decode_memory_mib=600)) is decode_budget(
        RunnerConfig(decode_memory_mib=600)
    )


# ---- end to end: peak memory of `radflow screen` over studies that decode to 256 MiB each ----

# Runs the command given and prints, as JSON, the peak RSS of its largest process
# (getrusage RUSAGE_CHILDREN: exact) and of its whole process tree (the sum over the command
# and its pool workers, sampled every 10 ms from /proc: it may miss a short spike).
_TREE_PEAK = r"""
import json, os, resource, subprocess, sys, threading
page = os.sysconf("SC_PAGE_SIZE")

def tree_rss(root):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    return total

child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
peak, done = 0, threading.Event()

def sample():
    global peak
    while not done.wait(0.01):
        peak = max(peak, tree_rss(child.pid))

sampler = threading.Thread(target=sample)
sampler.start()
out = child.communicate()[0]
done.set()
sampler.join()
largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"exit": child.returncode, "largest_mib": largest, "tree_mib": peak / 2**20,
                  "tail": out[-3000:]}))
"""


def _screen_peak(source: Path, dest: Path, config: Path, api_url: str) -> dict:
    cmd = [*RADFLOW, "screen", str(source), "--out", str(dest), "--config", str(config)]
    run = subprocess.run(
        [sys.executable, "-c", _TREE_PEAK, *cmd],
        env=child_env(api_url),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peak = json.loads(run.stdout)
    assert peak["exit"] == 0, peak["tail"]
    return peak


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_decoding_memory_stays_within_the_budget_in_threads_and_in_the_pool(
    prefect_harness, simulator, tmp_path, mode
):
    """Three studies of one 16384 × 8192 16-bit RLE frame each (4 MiB files, 256 MiB decoded,
    each charged 516 MiB): with an 800 MiB budget they are rendered one at a time and the
    peak RSS of `radflow screen` stays within the budget above what the same run takes over
    small images; in threads without it, they are rendered at once and it does not (the
    pool's two workers bound that case by themselves)."""
    n, budget = 3, 800
    small, large = tmp_path / "small", tmp_path / "large"
    for i in range(n):
        synthetic_ct(small / f"{i}.dcm", lesion=i % 2 == 0, seed=80 + i, size=128)
        large_rle(large / f"{i}.dcm", seed=90 + i)
    runs = [("small images", small, budget), ("budget", large, budget)]
    if mode == "thread":
        runs.append(("no budget", large, 1_048_576))
    peaks = {}
    for name, source, mib in runs:
        runner = {"preprocess": mode, "workers": 2, "decode_memory_mib": mib}
        (tmp_path / name).mkdir()
        config = sim_config(simulator, tmp_path / name, runner=runner)
        dest = tmp_path / name / "out"
        peaks[name] = _screen_peak(source, dest, config, prefect_harness)
        assert len(read_reports(dest)) == n, peaks[name]["tail"]
    # in threads the one process (exact); with the pool, the sum over the CLI and its workers
    key = "largest_mib" if mode == "thread" else "tree_mib"
    overhead, within = peaks["small images"][key], peaks["budget"][key]
    assert within <= overhead + budget, (within, overhead)
    without = ""
    if mode == "thread":
        assert peaks["no budget"][key] > overhead + budget, peaks  # the budget is what bounds it
        without = f" vs {peaks['no budget'][key]:.0f} MiB without,"
    where = "threads" if mode == "thread" else "process pool"
    print(
        f"\nRELIABILITY decode budget ({where}): {n} studies decoding to 256 MiB each "
        f"(4 MiB RLE files) → peak RSS {within:.0f} MiB with a {budget} MiB budget{without} "
        f"{overhead:.0f} MiB for the same run over 128² images (bound: {overhead + budget:.0f} MiB)"
    )
