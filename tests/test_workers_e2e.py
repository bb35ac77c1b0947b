"""Scale-out for real: `prefect server start`, a process work pool, two `prefect worker start`
processes and deployments/prefect.yaml's `shard` deployment. A 40-study run in 4 shards under
`limits: global` lands on both workers, never has more than a model's max_concurrency in
flight summed over the workers, and loses nothing when one worker is killed (SIGKILL, with
the flow-run processes it started, as when its node goes): the server marks its shard runs
Crashed once their heartbeats stop (the automation radflow creates), the parent runs them
again on the other worker, their reported studies are skipped and every study is reported
exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from simulator.process import running_simulator, stop
from simulator.samples import synthetic_ct
from tests.helpers import (
    BIN,
    KEY_ENV,
    RADFLOW,
    ROOT,
    TEST_KEY,
    prefect_api,
    prefect_cli,
    prefect_server_process,
    read_errors,
    read_reports,
    sim_config,
    tail,
    wait_for,
)

pytestmark = pytest.mark.e2e

STUDIES, SHARD, SLOTS = 40, 10, 2  # 4 shards; 2 calls in flight per model over every process
SILENCE = 60  # seconds without a heartbeat (sent every 30 s) before a shard run is Crashed


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, theirs, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc`` and every process it started, at once; how many flow-run processes
    (its descendants) died with it."""
    tree = _descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself just before
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return len(tree)


@pytest.fixture
def workers(tmp_path) -> Iterator[tuple[dict[str, str], dict[str, subprocess.Popen], Path]]:
    """A Prefect server, the `radflow` process pool, the shard deployment and two workers
    (at most two flow runs each), every process with its own log under ``tmp_path``."""
    (tmp_path / "prefect-home").mkdir()
    with prefect_server_process(tmp_path / "prefect-home") as env:
        env = env | {KEY_ENV: TEST_KEY}
        prefect_cli(env, "work-pool", "create", "radflow", "--type", "process")
        for block in ("radflow-openai-api-key", "radflow-anthropic-api-key"):
            code = f"from prefect.blocks.system import Secret; Secret(value='x').save('{block}')"
            subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
        prefect_cli(env, "deploy", "--name", "shard", "--prefect-file", "deployments/prefect.yaml")
        worker_env = env | {
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        procs: dict[str, subprocess.Popen] = {}
        try:
            for name in ("worker-a", "worker-b"):
                cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "radflow",
                       "--name", name, "--limit", "2", "--type", "process"]  # fmt: skip
                with open(tmp_path / f"{name}.log", "ab") as log:
                    procs[name] = subprocess.Popen(
                        cmd, env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                    )
            yield env, procs, tmp_path
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    for pid in _descendants(proc.pid):  # flow runs left by a failed test
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGTERM)
                    stop(proc)


def _shard_runs(env: dict[str, str]) -> list[dict]:
    deployment = prefect_api(env, "GET", "/deployments/name/screen/shard")
    body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "START_TIME_ASC"}
    return prefect_api(env, "POST", "/flow_runs/filter", json=body)


def _worker(run: dict) -> str | None:
    return (run.get("labels") or {}).get("prefect.worker.name")


def _shard_uids(dest: Path, run: dict) -> set[str]:
    """The studies of the shard a run screens, from the manifest its parent wrote."""
    manifest = json.loads((dest / run["parameters"]["manifest"]).read_text())
    return {study["uid"] for study in manifest["studies"]}


@pytest.mark.timeout(1200)  # ~3-5 min: the crash is only seen after SILENCE s without heartbeat
def test_two_workers_share_the_limits_and_a_killed_worker_loses_nothing(workers, capsys):
    env, procs, tmp = workers
    start = time.monotonic()

    def phase(name: str) -> None:  # the timeline docs/scaling.md quotes
        with capsys.disabled():
            print(f"\n[{time.monotonic() - start:6.1f} s] {name}", end="")

    source, dest = tmp / "in", tmp / "out"
    for i in range(STUDIES):
        synthetic_ct(source / f"{i:03d}.dcm", lesion=i % 2 == 0, seed=8000 + i, size=64)
    with running_simulator("--seed", "5", "--latency", "1") as sim:
        config = sim_config(
            sim,
            tmp,
            limits="global",
            preprocess={"max_edge": 64},
            runner={
                "shard_size": SHARD,
                "shards_in_flight": 4,
                "shard_deployment": "screen/shard",
                "shard_silence_seconds": SILENCE,
            },
        )
        models = yaml.safe_load(config.read_text())["models"]
        for model in models:
            model["max_concurrency"] = SLOTS
        config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"models": models}))
        sync = subprocess.run(
            [*RADFLOW, "limits", "sync", "--config", str(config)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr

        log = tmp / "parent.log"
        cmd = [*RADFLOW, "screen", str(source), "--out", str(dest), "--config", str(config)]
        with open(log, "ab") as out:
            parent = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)
        try:
            # the first wave: two shards on each worker, reading
            def both_running() -> list[dict]:
                assert parent.poll() is None, tail(log)
                running = [r for r in _shard_runs(env) if r["state_type"] == "RUNNING"]
                return running if {_worker(r) for r in running} == set(procs) else []

            wait_for("a running shard on each worker", both_running, timeout=300, every=1)
            phase("a shard running on each worker")

            # kill worker-a once one of its shards has reported some studies, not all
            def midway() -> dict | None:
                assert parent.poll() is None, tail(log)
                for run in _shard_runs(env):
                    if _worker(run) == "worker-a" and run["state_type"] == "RUNNING":
                        done = _shard_uids(dest, run) & set(read_reports(dest))
                        if 2 <= len(done) < SHARD:
                            return run
                return None

            victim = wait_for("worker-a's shard midway", midway, timeout=300, every=0.5)
            killed = _kill_tree(procs["worker-a"])
            assert killed >= 1  # its flow-run processes died with it
            phase(f"worker-a killed with {killed} processes, {len(read_reports(dest))} reported")
            wait_for(
                "the killed shard run marked Crashed",
                lambda: (
                    prefect_api(env, "GET", f"/flow_runs/{victim['id']}")["state_type"] == "CRASHED"
                ),
                timeout=SILENCE + 240,
                every=1,
            )
            phase("its shard run marked Crashed")
            parent.wait(timeout=900)
            phase("the parent run done")
        finally:
            if parent.poll() is None:
                stop(parent)
        stats = sim.stats()
    output = log.read_text()
    assert parent.returncode == 0, tail(log, 80)

    # every study reported once, none an error, one reading per model
    reports = read_reports(dest)
    assert len(reports) == STUDIES and not read_errors(dest), output[-3000:]
    assert all(len(r.readings) == 2 and r.status == "complete" for r in reports.values())

    runs = {r["id"]: r for r in _shard_runs(env)}
    crashed = [r for r in runs.values() if r["state_type"] == "CRASHED"]
    assert victim["id"] in {r["id"] for r in crashed}
    assert all(_worker(r) == "worker-a" for r in crashed)
    assert (
        "no heartbeat" in prefect_api(env, "GET", f"/flow_runs/{victim['id']}")["state"]["message"]
    )
    completed = [r for r in runs.values() if r["state_type"] == "COMPLETED"]
    assert len(completed) == 4  # one completed run per shard
    assert {_worker(r) for r in runs.values()} == set(procs)  # both workers ran shards
    manifests = [r["parameters"]["manifest"] for r in completed]
    assert len(set(manifests)) == 4
    rerun = [
        r for r in completed if r["parameters"]["manifest"] == victim["parameters"]["manifest"]
    ]
    assert [_worker(r) for r in rerun] == ["worker-b"]

    # the parent's summary adds the shards: the re-run's skipped studies count as reported
    [summary_file] = [
        p for p in (dest / "runs").glob("*.json") if json.loads(p.read_text())["shards"]
    ]
    summary = json.loads(summary_file.read_text())
    assert summary["reported"] == STUDIES and summary["errors"] == 0
    assert sorted(summary["shards"]) == sorted(r["id"] for r in completed)
    assert summary["kappa_studies"] == STUDIES and len(summary["panel_votes"]) == STUDIES
    # the parent asked for heartbeats every 30 s (the workers' environment does not)
    assert all(
        r["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        for r in runs.values()
    )
    again = json.loads((dest / "runs" / f"{rerun[0]['id']}.json").read_text())
    assert again["skipped"] >= 2  # what the killed run had reported: not read again
    assert again["header_reads"] == 0

    # summed over both workers, a model never had more than its slots in flight; a call is
    # asked twice only when it was in flight at the kill (answered ones come from the cache)
    for model in ("gpt-4o", "claude-sonnet-4-6"):
        assert stats["peak_in_flight"][model] <= SLOTS, stats["peak_in_flight"]
        assert STUDIES <= stats["requests"][model] <= STUDIES + SLOTS, stats["requests"]
