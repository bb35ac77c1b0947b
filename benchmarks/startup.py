"""Start-up benchmark: wall time and peak RSS of ``radflow screen`` on one study, the whole
command in a fresh process (imports, settings, the Prefect flow run, two model calls on the
simulator at latency 0, the report files), against a ``prefect server start`` (as a worker
has) and, with ``--ephemeral``, without one (Prefect's temporary server, as a first try has).

``--repo`` runs another checkout's ``radflow`` (its own ``.venv``) in the same conditions,
alternating with this one run by run: before/after on a shared machine.

    make bench-startup
    .venv/bin/python -m benchmarks.startup [--repeat 5] [--ephemeral] [--repo /work/main]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scale import KEY_ENV, build_studies, prefect_server, write_config
from simulator.process import running_simulator

__all__ = ["main", "screen_once"]

HERE = Path(__file__).resolve().parent.parent


def screen_once(
    repo: Path, study: Path, dest: Path, config: Path, env: dict
) -> tuple[float, float]:
    """``radflow screen`` from ``repo`` in a fresh process: (wall seconds, peak RSS in MB)."""
    cmd = [str(repo / ".venv/bin/python"), "-m", "flows.cli", "screen", str(study)]
    cmd += ["--out", str(dest), "--config", str(config), "--force"]
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"radflow screen in {repo} failed ({code}): {log.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux: KiB


def import_seconds(repo: Path, module: str) -> float:
    """Wall time of ``import module`` in a fresh interpreter of ``repo``."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run(
        [str(repo / ".venv/bin/python"), "-c", code], cwd=repo, check=True, capture_output=True
    )
    return float(out.stdout.decode().split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per checkout")
    parser.add_argument("--ephemeral", action="store_true", help="no Prefect server running")
    parser.add_argument("--repo", type=Path, action="append", default=[], help="also measure")
    parser.add_argument("--out", default="bench-output/startup", help="work folder")
    args = parser.parse_args(argv)
    repos = [HERE, *(r.resolve() for r in args.repo)]
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    study = build_studies(root, 1)
    runs: dict[Path, list[tuple[float, float]]] = {r: [] for r in repos}
    imports: dict[Path, list[float]] = {r: [] for r in repos}
    with (
        tempfile.TemporaryDirectory(prefix="radflow-bench-prefect-") as home,
        prefect_server(Path(home)) as (api_url, _server),
        running_simulator("--latency", "0", "--seed", "0") as sim,
    ):
        config = write_config(root / "radflow.yaml", sim.url, {})
        env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING", PREFECT_HOME=home)
        env[KEY_ENV] = "bench-key-not-secret"
        if args.ephemeral:
            env.pop("PREFECT_API_URL", None)
        else:
            env["PREFECT_API_URL"] = api_url
        for repo in repos:  # a first run each: server caches, the page cache
            screen_once(repo, study, root / "warm-up", config, env)
        for i in range(args.repeat):
            for repo in repos:  # alternating: both see the same load
                imports[repo].append(import_seconds(repo, "flows.screen"))
                runs[repo].append(screen_once(repo, study, root / f"out-{i}", config, env))
    mode = "temporary Prefect server" if args.ephemeral else "a running Prefect server"
    print(f"radflow screen, 1 study, {mode}, {args.repeat} runs each, load {os.getloadavg()}")
    for repo in repos:
        walls, rss = [w for w, _ in runs[repo]], [r for _, r in runs[repo]]
        print(
            f"{repo}: wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}, "
            f"max {max(walls):.2f}), peak RSS median {statistics.median(rss):.0f} MB "
            f"(max {max(rss):.0f}), import flows.screen median "
            f"{statistics.median(imports[repo]):.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
