"""Scale-out: the sharded screening path as child flow runs on a real Prefect API (shard
planning and merging: test_summary.py), and preprocessing in a process pool."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.exceptions import ObjectNotFound

from flows.screen import screen
from simulator.samples import synthetic_ct
from tasks.core.config import RunnerConfig, Settings, StorageConfig
from tasks.core.errors import ConfigError, WorkerCrashed
from tasks.core.schema import RunSummary
from tasks.screening.pool import (
    POOL_MIN_CPUS,
    POOL_MIN_STUDIES,
    off_loop,
    resolve_runner,
    shutdown_pools,
)
from tasks.storage import LocalStore
from tests.helpers import (
    RADFLOW,
    child_env,
    process,
    read_reports,
    run_radflow,
    sim_calls,
    sim_config,
)


def test_runner_config_rejects_bad_values():
    with pytest.raises(ValueError, match="preprocess"):
        Settings.model_validate({"runner": {"preprocess": "fork"}})
    with pytest.raises(ValueError, match="shard_size"):
        Settings.model_validate({"runner": {"shard_size": -1}})
    assert Settings().runner == RunnerConfig(preprocess="auto", shard_size=0)


def test_auto_takes_the_pool_only_for_large_runs_on_enough_cpus(monkeypatch):
    auto = RunnerConfig()
    monkeypatch.setattr("os.cpu_count", lambda: POOL_MIN_CPUS)
    assert resolve_runner(auto, POOL_MIN_STUDIES).preprocess == "process"
    assert resolve_runner(auto, POOL_MIN_STUDIES - 1).preprocess == "thread"
    monkeypatch.setattr("os.cpu_count", lambda: POOL_MIN_CPUS - 1)
    assert resolve_runner(auto, 10_000).preprocess == "thread"
    fixed = RunnerConfig(preprocess="process")
    assert resolve_runner(fixed, 1) is fixed  # an explicit choice stands


def _die(store, code: int) -> None:
    os._exit(code)  # a worker killed mid-study (out of memory, a crash in a decoder)


def _where(store) -> str:
    return store.uri


@pytest.mark.e2e
def test_a_dead_pool_worker_fails_its_study_and_the_next_call_gets_a_new_pool(tmp_path):
    runner = RunnerConfig(preprocess="process", workers=1)
    store = LocalStore(tmp_path)

    async def calls() -> str:
        with pytest.raises(WorkerCrashed, match="_die lost its pool process"):
            await off_loop(runner, StorageConfig(), _die, [store], 3)
        return await off_loop(runner, StorageConfig(), _where, [store])

    try:
        assert asyncio.run(calls()) == str(tmp_path)
    finally:
        shutdown_pools()


def _tiny_studies(root: Path, n: int) -> Path:
    for i in range(n):
        synthetic_ct(root / f"{i:03d}.dcm", lesion=i % 2 == 0, seed=7000 + i, size=64)
    return root


@pytest.mark.e2e
def test_sharded_run_reports_every_study_exactly_once(prefect_harness, simulator, tmp_path):
    source = _tiny_studies(tmp_path / "in", 7)
    config = sim_config(simulator, tmp_path, preprocess={"max_edge": 64}, runner={"shard_size": 3})
    dest = tmp_path / "out"
    before = sim_calls(simulator)

    summary = asyncio.run(screen(str(source), str(dest), str(config)))

    assert summary.studies == 7 == summary.reported and summary.errors == 0
    assert len(summary.shards) == 3 == len(set(summary.shards))  # 3 + 3 + 1 studies
    reports = read_reports(dest)
    assert len(reports) == 7 and all(r.status == "complete" for r in reports.values())
    # every study read once: two models each, no study in two shards
    assert sim_calls(simulator) - before == 14 == summary.model_calls
    children = [
        RunSummary.model_validate_json((dest / "runs" / f"{run_id}.json").read_text())
        for run_id in summary.shards
    ]
    assert sorted(c.reported for c in children) == [1, 3, 3]
    # the kappa is over the whole run: every shard's votes, not one shard's
    assert summary.kappa_studies == 7 and sorted(c.kappa_studies for c in children) == [1, 3, 3]
    assert len(summary.panel_votes) == 7
    # every header read once, by the parent: each shard screens from its manifest
    assert summary.header_reads == 7 and [c.header_reads for c in children] == [0, 0, 0]
    assert len(list((dest / "shards" / summary.run_id).glob("*.json"))) == 3
    parent = json.loads((dest / "runs" / f"{summary.run_id}.json").read_text())
    assert parent["reported"] == 7 and sorted(parent["shards"]) == sorted(summary.shards)
    # the provider comparison adds the shards': counts, tokens, cost and latency buckets
    assert set(summary.models) == {"gpt-4o", "claude"}
    for name, stats in summary.models.items():
        shards = [c.models[name] for c in children]
        assert stats.calls == 7 == sum(s.calls for s in shards) == stats.answered
        assert stats.input_tokens == sum(s.input_tokens for s in shards) > 0
        assert stats.cost_usd == pytest.approx(sum(s.cost_usd for s in shards))
        assert sum(stats.latency_buckets.values()) == 7
        assert stats.latency_max_ms == max(s.latency_max_ms for s in shards)

    # a rerun skips everything at the parent: no shards, no model calls
    again = asyncio.run(screen(str(source), str(dest), str(config)))
    assert again.skipped == 7 and again.shards == [] and sim_calls(simulator) - before == 14


@pytest.mark.e2e
def test_process_pool_renders_the_same_images_as_threads(prefect_harness, simulator, tmp_path):
    source = _tiny_studies(tmp_path / "in", 3)
    results = {}
    for mode in ("thread", "process"):
        config = sim_config(
            simulator,
            tmp_path,
            preprocess={"max_edge": 64},
            runner={"preprocess": mode, "workers": 2},
        )
        dest = tmp_path / f"out-{mode}"
        summary = asyncio.run(screen(str(source), str(dest), str(config)))
        assert summary.reported == 3
        results[mode] = {uid: [i.sha256 for i in r.images] for uid, r in read_reports(dest).items()}
        for uid in results[mode]:  # the SR and FHIR files are written in the pool too
            written = {p.name for p in (dest / "studies" / uid).iterdir()}
            assert {"report.sr.dcm", "report.fhir.json", "report.md"} <= written
    assert results["process"] == results["thread"] and len(results["thread"]) == 3


def test_config_runner_section_round_trips(tmp_path):
    from tasks.core.config import load_settings

    path = tmp_path / "radflow.yaml"
    path.write_text(yaml.safe_dump({"runner": {"shard_size": 500, "shards_in_flight": 4}}))
    runner = load_settings(path).runner
    assert (runner.shard_size, runner.shards_in_flight, runner.shard_deployment) == (500, 4, None)


def test_limits_are_global_by_default_when_shards_run_on_a_work_pool(tmp_path):
    """Shards on a work pool are several processes (maybe machines) calling one panel."""
    on_pool = {"shard_deployment": "screen/shard"}
    assert Settings().limits == "local"
    assert Settings(runner={"shard_size": 500}).limits == "local"  # subflows: one process
    assert Settings(runner=on_pool).limits == "global"
    assert Settings(runner=on_pool, limits="local").limits == "local"  # a choice stays
    assert Settings(limits="global").limits == "global"


@pytest.mark.e2e
@pytest.mark.timeout(900)  # `radflow serve` and each shard run import radflow in a new process
def test_shards_run_as_deployment_runs_on_a_served_deployment(prefect_harness, simulator, tmp_path):
    """runner.shard_deployment: each shard is a run of deployments/prefect.yaml's `shard`
    deployment, executed by `radflow serve` in its own process (as a worker would)."""
    from prefect.client.orchestration import get_client

    source = _tiny_studies(tmp_path / "in", 4)
    config = sim_config(
        simulator,
        tmp_path,
        preprocess={"max_edge": 64},
        runner={"shard_size": 2, "shards_in_flight": 2, "shard_deployment": "screen/shard"},
    )
    dest = tmp_path / "out"
    log = tmp_path / "serve.log"
    # shards on a work pool: the panel's limits are global by default, created as a user would
    synced = run_radflow("limits", "sync", "--config", str(config), api_url=prefect_harness)
    assert synced.returncode == 0, synced.stderr[-2000:]
    serve_cmd = [*RADFLOW, "serve", "--only", "shard", "--poll-seconds", "1"]
    with process(serve_cmd, child_env(prefect_harness), log) as serve:

        async def registered() -> bool:
            async with get_client() as client:
                try:
                    await client.read_deployment_by_name("screen/shard")
                except ObjectNotFound:
                    return False
                return True

        deadline = time.monotonic() + 180
        while not asyncio.run(registered()):  # start-up of the server process, not a test race
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "radflow serve did not register `shard`"
            time.sleep(0.5)

        summary = asyncio.run(screen(str(source), str(dest), str(config)))

    assert summary.reported == 4 == len(read_reports(dest)) and summary.errors == 0
    assert len(summary.shards) == 2 and summary.model_calls == 8

    async def child_runs() -> list:
        async with get_client() as client:
            return [await client.read_flow_run(UUID(i)) for i in summary.shards]

    runs = asyncio.run(child_runs())
    assert all(r.state.is_completed() and r.deployment_id for r in runs)
    assert all(r.parent_task_run_id is not None for r in runs)  # linked to the parent run


@pytest.mark.e2e
def test_a_missing_shard_deployment_fails_before_any_study_is_read(
    prefect_harness, simulator, tmp_path
):
    source = _tiny_studies(tmp_path / "in", 3)
    config = sim_config(
        simulator,
        tmp_path,
        limits="local",  # the deployment is what is missing here, not the limits
        runner={"shard_size": 1, "shard_deployment": "screen/nope"},
    )
    before = sim_calls(simulator)
    with pytest.raises(ConfigError, match='runner.shard_deployment "screen/nope" is not a'):
        asyncio.run(screen(str(source), str(tmp_path / "out"), str(config)))
    assert sim_calls(simulator) == before
    assert not list((tmp_path / "out").glob("studies/*/report.json"))
