"""Panel-wide provider limits across processes (``limits: global``): the limits a config
needs, a run without them failing before any model call, and two `radflow screen` processes
sharing one model's max_concurrency through a real Prefect API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tasks.core.config import Settings
from tasks.models.limits import (
    LimitSpec,
    SharedSlots,
    limit_specs,
    rate_name,
    slot_name,
    sync_limits,
)
from tests.helpers import (
    RADFLOW,
    child_env,
    prefect_api,
    process,
    read_errors,
    read_reports,
    run_radflow,
    run_screen,
    sim_calls,
    sim_config,
    tail,
    wait_for,
)

STUDIES = 8  # per process; at 0.5 s a call, 2 in flight, the two runs read for ~4 s together


def _global_config(sim, tmp_path: Path, prefix: str, max_concurrency: int) -> Path:
    """``sim_config`` with ``limits: global``, the models renamed ``<prefix>-<name>``
    (limits of the session's shared Prefect API are this test's own) at ``max_concurrency``."""
    path = sim_config(sim, tmp_path, limits="global")
    config = yaml.safe_load(path.read_text())
    for model in config["models"]:
        model.update(name=f"{prefix}-{model['name']}", max_concurrency=max_concurrency)
    path.write_text(yaml.safe_dump(config))
    return path


def test_limit_specs_cover_every_model_and_fallback():
    fallback = {"name": "small", "provider": "openai", "model": "gpt-4o-mini", "max_concurrency": 3}
    settings = Settings.model_validate(
        {
            "models": [
                {"name": "a", "provider": "openai", "model": "gpt-4o", "max_concurrency": 5,
                 "requests_per_minute": 90, "fallback": fallback},
                {"name": "b", "provider": "anthropic", "model": "claude-sonnet-4-6"},
            ],
        }
    )  # fmt: skip
    assert limit_specs(settings) == [
        LimitSpec(slot_name("a"), 5),
        LimitSpec(rate_name("a"), 2, 1.5),  # one second of requests, 1.5 slots free per second
        LimitSpec(slot_name("small"), 3),
        LimitSpec(slot_name("b"), 8),
    ]
    assert Settings().limits == "local"
    with pytest.raises(ValueError, match="limits"):
        Settings.model_validate({"runner": {"limits": "cluster"}})


@pytest.mark.e2e
def test_global_limits_missing_fail_the_run_before_any_model_call(
    prefect_harness, simulator, samples, tmp_path
):
    config = _global_config(simulator, tmp_path, "unsynced", 2)
    before = sim_calls(simulator)
    result = run_screen(samples, tmp_path / "out", config, api_url=prefect_harness, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert 'global limit "radflow-model-unsynced-gpt-4o" does not exist' in err, err
    assert "radflow limits sync --config FILE" in err
    assert sim_calls(simulator) == before  # no model was called
    assert not read_reports(tmp_path / "out")


@pytest.mark.e2e
def test_two_processes_share_one_models_max_concurrency(prefect_harness, tmp_path):
    """Both processes are held at their first model call (the test takes every slot) until
    both are there, then share each model's 2 slots."""
    url = prefect_harness
    limits = [slot_name(f"shared-{m}") for m in ("gpt-4o", "claude")]
    with running_simulator("--seed", "3", "--latency", "0.5") as sim:
        config = _global_config(sim, tmp_path, "shared", 2)
        synced = run_radflow("limits", "sync", "--config", str(config), api_url=url)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        for name in limits:
            assert name in synced.stdout
            held = prefect_api(url, "GET", f"/v2/concurrency_limits/{name}")
            assert (held["limit"], held["active"]) == (2, True)

        runs = []
        for side in ("a", "b"):
            source = tmp_path / f"src-{side}"
            build_sample_folder(source, synthetic=STUDIES, real=False, junk=False)
            dest = tmp_path / f"out-{side}"
            cmd = [*RADFLOW, "screen", str(source), "--out", str(dest), "--config", str(config)]
            runs.append((dest, tmp_path / f"{side}.log", cmd))
        env = child_env(url)
        slots = {"names": limits, "slots": 2}
        prefect_api(url, "POST", "/v2/concurrency_limits/increment", json=slots)
        with process(runs[0][2], env, runs[0][1]) as a, process(runs[1][2], env, runs[1][1]) as b:
            try:
                wait_for("both runs at their model calls", lambda: len(_reading(url)) >= 2, 150)
                assert sim_calls(sim) == 0  # nobody got past the held slots
            finally:
                prefect_api(url, "POST", "/v2/concurrency_limits/decrement", json=slots)
            for proc, (_, log, _) in ((a, runs[0]), (b, runs[1])):
                assert proc.wait(timeout=180) == 0, tail(log)
        stats = sim.stats()

    reports = [read_reports(dest) for dest, _, _ in runs]
    assert [len(r) for r in reports] == [STUDIES, STUDIES], [tail(log) for _, log, _ in runs]
    assert not any(read_errors(dest) for dest, _, _ in runs)
    # both wanted every model at once (above); summed over both, no model ever had more
    # than its 2 calls in flight (which process got the slots first is not fixed: a process
    # keeps its slots while its calls want them, tasks/models/limits.py)
    for model in ("gpt-4o", "claude-sonnet-4-6"):
        assert stats["requests"][model] == 2 * STUDIES  # one reading per study, no retry
        assert stats["peak_in_flight"][model] == 2, stats["peak_in_flight"]


def _reading(url: str) -> list[dict]:
    """The screen-studies task runs running now (a run's studies past preprocessing wait
    there for their model calls)."""
    running = {"state": {"type": {"any_": ["RUNNING"]}}, "name": {"like_": "studies-"}}
    return prefect_api(url, "POST", "/task_runs/filter", json={"task_runs": running})


@pytest.mark.e2e
def test_shared_slots_hand_over_and_give_back(prefect_harness):
    """Five calls at once through one process's SharedSlots on a limit of 2: never more than
    2 inside, the waiting calls get the slots the finished ones hand over, and none is left
    held on the server afterwards."""
    settings = Settings.model_validate(
        {"models": [{"name": "handover", "provider": "openai", "model": "gpt-4o",
                     "max_concurrency": 2}]}
    )  # fmt: skip
    inside, peak = 0, 0

    async def call(slots: SharedSlots) -> None:
        nonlocal inside, peak
        async with slots.slot():
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.2)
            inside -= 1

    async def main() -> int:
        await sync_limits(settings)
        slots = SharedSlots("handover")
        await asyncio.gather(*(call(slots) for _ in range(5)))
        taken = slots.acquired
        await slots.aclose()
        return taken

    taken = asyncio.run(main())
    held = prefect_api(prefect_harness, "GET", f"/v2/concurrency_limits/{slot_name('handover')}")
    assert peak == 2
    assert taken == 2  # the other three calls were handed a slot, no server round trip
    assert held["active_slots"] == 0
