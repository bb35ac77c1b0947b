"""The provider comparison of docs/models.md, measured: two simulator processes (a TEST DOUBLE)
at two latencies, a cheap OpenAI model on the fast one and a dear Anthropic model on the slow
one; `radflow screen --estimate`, then the run, then `radflow runs compare --plot`, and how far
the estimate was from the usage the simulator reported.

    make bench-compare
    .venv/bin/python -m benchmarks.compare [--synthetic 16] [--fast 0.3] [--slow 1.2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tasks.core.schema import RunSummary

__all__ = ["main"]

KEY_ENV = "BENCH_SIM_KEY"
RADFLOW = [sys.executable, "-m", "flows.cli"]


def _models(fast: str, slow: str) -> list[dict]:
    common = {"api_key_env": KEY_ENV}
    return [
        {"name": "fast-cheap", "provider": "openai", "model": "gpt-4o-mini",
         "base_url": fast + "/v1", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
         **common},
        {"name": "slow-dear", "provider": "anthropic", "model": "claude-sonnet-4-6",
         "base_url": slow, "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}, **common},
    ]  # fmt: skip


def _run(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([*RADFLOW, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"radflow {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _estimated_inputs(table: str) -> dict[str, int]:
    """Input tokens per model from the --estimate table (its 9th column)."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 12 and cells[0] in ("fast-cheap", "slow-dear"):
            out[cells[0]] = int(cells[8])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=16, help="synthetic studies to add")
    parser.add_argument("--fast", type=float, default=0.3, help="fast simulator latency (s)")
    parser.add_argument("--slow", type=float, default=1.2, help="slow simulator latency (s)")
    parser.add_argument("--out", type=Path, default=Path("bench-output/compare"))
    a = parser.parse_args()
    samples, dest = a.out / "samples", a.out / "reports"
    shutil.rmtree(a.out, ignore_errors=True)  # a fresh DEST: no report, no cached reading
    build_sample_folder(samples, synthetic=a.synthetic)
    env = dict(os.environ, **{KEY_ENV: "sk-bench", "COLUMNS": "240"})
    with (
        running_simulator("--latency", str(a.fast), "--seed", "1") as fast,
        running_simulator("--latency", str(a.slow), "--seed", "1") as slow,
    ):
        config = a.out / "radflow.yaml"
        config.write_text(yaml.safe_dump({"language": "en", "models": _models(fast.url, slow.url)}))
        screen = ["screen", str(samples), "--out", str(dest), "--config", str(config)]
        estimate = _run([*screen, "--estimate"], env)
        print(estimate)
        asked = sum(fast.stats()["requests"].values()) + sum(slow.stats()["requests"].values())
        print(f"simulator requests during the estimate: {asked}")
        started = time.perf_counter()
        print(_run(screen, env))
        print(f"run: {time.perf_counter() - started:.1f} s wall clock (CLI start included)")
    newest = max((dest / "runs").glob("*[0-9a-f].json"), key=lambda p: p.stat().st_mtime)
    print(_run(["runs", "compare", str(newest), "--plot", str(a.out / "compare.png")], env))
    run = RunSummary.model_validate_json(newest.read_text())
    for name, tokens in _estimated_inputs(estimate).items():
        used = run.models[name].input_tokens
        print(
            f"{name}: estimated {tokens} input tokens, simulator {used} ({tokens / used - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
