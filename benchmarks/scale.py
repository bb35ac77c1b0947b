"""Scale benchmark: screen 1, 200 and 2,000 (or 1,000 and 10,000) tiny synthetic studies
against the simulator at latency 0 on a real Prefect server; print marginal time per study,
the peak RSS of every process and the Prefect server's load per run.

Each size runs in its own process (so its peak RSS is its own; its pool processes' peaks are
their ``VmHWM`` at the end of the run) against one ``prefect server start`` (SQLite) and one simulator
process, whose peak RSS (``VmHWM``) and CPU seconds are read from ``/proc``. Targets: the
marginal time (beyond the 1-study run) of 2,000 studies is at most 11x that of 200 (issue 10),
of 10,000 at most 10.5x that of 1,000 (issue 18); every process peaks at <= 1 GB.

    make bench-scale                                   # 1, 200, 2,000
    make bench-scale STUDIES=1,1000,10000              # the 10,000-study point (opt-in, long)
    .venv/bin/python -m benchmarks.scale --sizes 1,200,2000 [--shard-size 500] [--preprocess process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from simulator.process import free_port, running_simulator, serving
from simulator.samples import synthetic_ct

__all__ = ["main", "marginal_ratio"]

KEY_ENV = "RADFLOW_BENCH_KEY"
RSS_LIMIT_MB = 1024.0
# the largest marginal-time ratio accepted for (smaller, larger) sizes; other pairs: 1.1x linear
LINEAR_LIMITS = {(200, 2000): 11.0, (1000, 10000): 10.5}


def build_studies(root: Path, n: int, size: int = 64) -> Path:
    """``n`` one-slice synthetic CT studies of ``size`` px (every third with a lesion)."""
    folder = root / f"studies-{n}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(n):
        synthetic_ct(folder / f"{i:05d}.dcm", lesion=i % 3 == 0, seed=50_000 + i, size=size)
    marker.touch()
    return folder


def write_config(path: Path, sim_url: str, runner: dict) -> Path:
    models = [
        {
            "name": "gpt-4o",
            "provider": "openai",
            "model": "gpt-4o",
            "base_url": sim_url + "/v1",
            "api_key_env": KEY_ENV,
            "max_concurrency": 32,
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-sonnet-4-6",
            "base_url": sim_url,
            "api_key_env": KEY_ENV,
            "max_concurrency": 32,
        },
    ]
    config = {"language": "en", "preprocess": {"max_edge": 64}, "models": models}
    if runner:
        config["runner"] = runner
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def prefect_server(home: Path, wait: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``prefect server start`` on a free loopback port with its own SQLite database."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}/api"
    with serving([*cmd, "--port", str(port)], url + "/health", name="prefect server",
                 env=env, wait=wait) as proc:  # fmt: skip
        yield url, proc


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc`` (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while listed
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def process_load(pid: int) -> dict[int, tuple[str, float, float]]:
    """Per process of ``pid``'s tree: (command, peak RSS in MB (``VmHWM``), CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        hwm = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM")), "0")
        out[p] = (cmd[:60], int(hwm) / 1024, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_seconds(load: dict[int, tuple[str, float, float]]) -> float:
    return sum(cpu for _, _, cpu in load.values())


def run_one(source: Path, dest: Path, config: Path, api_url: str) -> dict:
    """Screen ``source`` in a fresh process; its result plus its own peak RSS (MB)."""
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_LOGGING_LEVEL="WARNING")
    env[KEY_ENV] = "bench-key-not-secret"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", str(source), str(dest), str(config)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read()  # until the child closes it; wait4 then reaps it
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"screening {source} failed ({code}): {tail}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def child(source: str, dest: str, config: str) -> None:
    """In the child process: one screening run, timed; prints one JSON line."""
    from flows.screen import screen
    from tasks.screening.pool import shutdown_pools

    started = time.perf_counter()
    summary = asyncio.run(screen(source, dest, config, force=True))
    seconds = time.perf_counter() - started
    pool = [rss for pid, (_, rss, _) in process_load(os.getpid()).items() if pid != os.getpid()]
    shutdown_pools()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool_peak = max(pool, default=0.0)  # the pool processes, still up after the flow run
    print(
        json.dumps(
            {
                "seconds": seconds,
                "studies": summary.studies,
                "reported": summary.reported,
                "errors": summary.errors,
                "model_calls": summary.model_calls,
                "self_rss_mb": peak,
                "pool_rss_mb": pool_peak,
                "shards": len(summary.shards),
            }
        )
    )


def marginal_ratio(times: dict[int, float], small: int, large: int) -> float:
    """How many times the marginal time (over the 1-study run) of ``large`` is that of ``small``."""
    return (times[large] - times[1]) / (times[small] - times[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,200,2000", help="comma-separated study counts")
    parser.add_argument("--out", default="bench-output/scale", help="work folder")
    parser.add_argument("--shard-size", type=int, default=None, help="runner.shard_size")
    parser.add_argument("--preprocess", choices=["thread", "process"], default=None)
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "DEST", "CONFIG"))
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    runner = {}
    if args.shard_size is not None:
        runner["shard_size"] = args.shard_size
    if args.preprocess:
        runner["preprocess"] = args.preprocess
    folders = {n: build_studies(root, n) for n in sizes}
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="radflow-bench-prefect-") as home,
        prefect_server(Path(home)) as (api_url, server),
        running_simulator("--latency", "0", "--seed", "0") as sim,
    ):
        config = write_config(root / "radflow.yaml", sim.url, runner)
        run_one(folders[1], root / "warmup", config, api_url)  # server caches, imports
        for n in sizes:
            dest = root / f"out-{n}"
            shutil.rmtree(dest, ignore_errors=True)
            server_cpu = cpu_seconds(process_load(server.pid))
            result = run_one(folders[n], dest, config, api_url)
            if result["reported"] != n:
                raise RuntimeError(f"{n} studies in, {result['reported']} reported")
            server_load = process_load(server.pid)
            result["server_cpu_s"] = cpu_seconds(server_load) - server_cpu
            result["server_rss_mb"] = max(rss for _, rss, _ in server_load.values())
            rows.append((n, result))
            print(
                f"{n:>6} studies  {result['seconds']:8.2f} s  peak RSS: run "
                f"{result['self_rss_mb']:6.1f} MB, pool {result['pool_rss_mb']:6.1f} MB, "
                f"server {result['server_rss_mb']:6.1f} MB  ({result['model_calls']} model "
                f"calls, {result['shards']} shards; server {result['server_cpu_s']:.1f} CPU-s, "
                f"load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        simulator_rss = max(rss for _, rss, _ in process_load(sim.process.pid).values())
    times = {n: r["seconds"] for n, r in rows}
    print(f"\nrunner: {runner or 'defaults'}")
    for n in sizes[1:]:
        per = (times[n] - times[1]) / (n - 1) * 1000
        print(f"marginal time per study at {n:>5}: {per:7.1f} ms")
    ok = True
    if len(sizes) >= 3:
        small, large = sizes[-2], sizes[-1]
        ratio = marginal_ratio(times, small, large)
        expected = (large - 1) / (small - 1)
        limit = LINEAR_LIMITS.get((small, large), 1.1 * expected)
        ok &= ratio <= limit
        print(
            f"marginal time {large} vs {small}: {ratio:.2f}x (linear {expected:.2f}x, "
            f"target <= {limit:.2f}x) {'PASS' if ratio <= limit else 'FAIL'}"
        )
    peaks = {
        "screening runs": max(r["self_rss_mb"] for _, r in rows),
        "pool processes": max(r["pool_rss_mb"] for _, r in rows),
        "prefect server": max(r["server_rss_mb"] for _, r in rows),
        "simulator": simulator_rss,
    }
    for what, peak in peaks.items():
        ok &= peak <= RSS_LIMIT_MB
        verdict = "PASS" if peak <= RSS_LIMIT_MB else "FAIL"
        print(f"peak RSS of the {what}: {peak:.0f} MB (target <= {RSS_LIMIT_MB:.0f}) {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
