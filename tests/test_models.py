"""The model layer against the simulator process over HTTP: limits, retries, re-ask, refusal,
fallback, cache, cost and gateways, then the screening flow with 25% injected faults."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml

from flows.screen import screen
from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tasks.core.config import Settings
from tasks.core.schema import ModelReading, Report, RunSummary
from tasks.models.cache import ReadingCache, reading_key
from tasks.models.panel import Panel, load_prompt
from tasks.storage import LocalStore
from tests.helpers import (
    KEY_ENV,
    TEST_KEY,
    read_many,
    read_reports,
    sim_model,
    sim_settings,
    tiny_png,
)

PROMPT = load_prompt("en")
CONTEXT = {"modality": "CT"}


def _delta(before: dict, after: dict, field: str) -> dict[str, int]:
    return {m: n - before.get(field, {}).get(m, 0) for m, n in after.get(field, {}).items()}


# ---- pure: the cache key and the cache ----------------------------------------------------


def test_cache_key_changes_with_everything_that_decides_the_answer():
    args = (["a" * 64], "v1-x", "ctx", "openai", "gpt-4o", "https://e/v1", {"max": 1})
    key = reading_key(*args)
    assert key == reading_key(*args) and len(key) == 64
    for i, other in enumerate(
        [["b" * 64], "v2-x", "ctx2", "anthropic", "gpt-4.1", "https://f/v1", {"max": 2}]
    ):
        changed = list(args)
        changed[i] = other
        assert reading_key(*changed) != key, f"argument {i} is not part of the key"


def test_cache_stores_successes_only_and_marks_hits(tmp_path):
    cache = ReadingCache(LocalStore(tmp_path))
    good = ModelReading(model="m", provider="openai", model_id="x", ok=True, cost_usd=0.01)
    bad = ModelReading(model="m", provider="openai", model_id="x", ok=False, error="boom")
    assert cache.put("ab" + "0" * 62, good) and not cache.put("cd" + "0" * 62, bad)
    assert cache.get("cd" + "0" * 62) is None
    hit = cache.get("ab" + "0" * 62)
    assert hit and hit.cached and hit.cost_usd == 0.01
    assert (tmp_path / "cache/readings/ab" / ("ab" + "0" * 62 + ".json")).is_file()
    (tmp_path / "cache/readings/ab" / ("ab" + "0" * 62 + ".json")).write_text("{broken")
    assert cache.get("ab" + "0" * 62) is None  # a corrupt entry is asked again, not trusted


# ---- against the simulator process -------------------------------------------------------


@pytest.mark.e2e
def test_concurrency_limit_holds_and_is_reached():
    with running_simulator("--latency", "0.2", "--seed", "1") as sim:
        settings = sim_settings(
            sim_model(sim, "openai", max_concurrency=3),
            sim_model(sim, "anthropic", max_concurrency=5),
        )
        results = asyncio.run(read_many(settings, 24))
        stats = sim.stats()
    assert all(r.ok for rs in results for r in rs)
    assert stats["peak_in_flight"] == {"gpt-4o": 3, "claude-sonnet-4-6": 5}
    assert stats["requests"] == {"gpt-4o": 24, "claude-sonnet-4-6": 24}


@pytest.mark.e2e
def test_requests_per_minute_spaces_requests():
    with running_simulator("--seed", "1") as sim:
        settings = sim_settings(sim_model(sim, "openai", requests_per_minute=120))  # 2 per second
        start = time.perf_counter()
        results = asyncio.run(read_many(settings, 7))
        elapsed = time.perf_counter() - start
    assert all(rs[0].ok for rs in results)
    # a burst of 2, then one every 0.5 s: the 7th request cannot start before 2.5 s
    assert elapsed >= 2.4


@pytest.mark.e2e
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_429_is_retried_honouring_retry_after(provider):
    with running_simulator("--faults", "429:1", "--retry-after", "1.5") as sim:
        settings = sim_settings(sim_model(sim, provider, max_retries=2))
        start = time.perf_counter()
        [[reading]] = asyncio.run(read_many(settings, 1))
        elapsed = time.perf_counter() - start
    assert not reading.ok and "RateLimitError" in reading.error and reading.requests == 3
    # two waits of Retry-After (1.5 s); the SDK's own back-off would wait 0.4-1.5 s in total
    assert elapsed >= 3.0


@pytest.mark.e2e
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_timeout_is_per_call_and_retried(provider):
    with running_simulator("--faults", "timeout:1") as sim:
        settings = sim_settings(sim_model(sim, provider, timeout_seconds=0.5, max_retries=1))
        start = time.perf_counter()
        [[reading]] = asyncio.run(read_many(settings, 1))
        elapsed = time.perf_counter() - start
        stats = sim.stats()
    assert not reading.ok and "APITimeoutError" in reading.error
    assert reading.requests == 2 and stats["injected"] == {"timeout": 2}
    assert elapsed < 30  # the simulator would hang 60 s; the client gave up after 0.5 s twice


@pytest.mark.e2e
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_malformed_answer_is_asked_again_once_with_the_error(provider):
    with running_simulator("--faults", "malformed:1", "--record-bodies") as sim:
        [[reading]] = asyncio.run(read_many(sim_settings(sim_model(sim, provider)), 1))
        bodies = sim.bodies()
    assert not reading.ok and reading.reasked and reading.requests == 2
    assert reading.error.startswith("InvalidAnswer:")
    assert reading.input_tokens > 0  # both answers were paid for and are counted
    [first, second] = next(iter(bodies.values()))
    assert "failed validation" not in first and "failed validation" in second


@pytest.mark.e2e
def test_malformed_answers_recover_on_the_reask():
    with running_simulator("--faults", "malformed:0.5", "--seed", "5") as sim:
        settings = sim_settings(sim_model(sim, "openai"), sim_model(sim, "anthropic"))
        results = asyncio.run(read_many(settings, 12))
    flat = [r for rs in results for r in rs]
    recovered = [r for r in flat if r.reasked and r.ok]
    assert {r.provider for r in recovered} == {"openai", "anthropic"}
    assert all(r.requests == 1 + r.reasked for r in flat)


@pytest.mark.e2e
def test_refusal_is_recorded_and_the_fallback_answers(simulator):
    with running_simulator("--faults", "refusal:1") as sim:
        alone = sim_settings(sim_model(sim, "anthropic"))
        [[refused]] = asyncio.run(read_many(alone, 1))
        backup = sim_model(simulator, "openai", name="backup")
        with_fallback = sim_settings(sim_model(sim, "anthropic", fallback=backup))
        [[served]] = asyncio.run(read_many(with_fallback, 1))
    assert not refused.ok and refused.refusal and refused.error.startswith("refused:")
    assert refused.requests == 1 and refused.output_tokens > 0
    assert served.ok and served.model == "anthropic" and served.fallback == "backup"
    assert served.model_id == "gpt-4o" and served.primary_error.startswith("refused:")
    assert served.requests == 2
    assert served.cost_usd == pytest.approx(
        refused.cost_usd
        + (served.input_tokens - refused.input_tokens) * 2.5e-6
        + (served.output_tokens - refused.output_tokens) * 1e-5
    )


@pytest.mark.e2e
def test_cache_makes_a_second_read_free(simulator, tmp_path):
    cache = ReadingCache(LocalStore(tmp_path))
    settings = sim_settings(sim_model(simulator, "openai"), sim_model(simulator, "anthropic"))
    before = simulator.stats()
    first = asyncio.run(read_many(settings, 3, cache, offset=500))
    middle = simulator.stats()
    second = asyncio.run(read_many(settings, 3, cache, offset=500))
    after = simulator.stats()
    assert sum(_delta(before, middle, "requests").values()) == 6
    assert sum(_delta(middle, after, "requests").values()) == 0
    for a, b in zip(first, second, strict=True):
        for x, y in zip(a, b, strict=True):
            assert not x.cached and y.cached and x.cache_key == y.cache_key
            assert x.model_dump(exclude={"cached", "cache_key"}) == y.model_dump(
                exclude={"cached", "cache_key"}
            )
    assert len(list(tmp_path.glob("cache/readings/*/*.json"))) == 6


@pytest.mark.e2e
def test_gateway_serves_both_sdks_and_a_model_may_override(simulator):
    gateway = {"base_url": simulator.url, "api_key_env": KEY_ENV}
    headers = {"x-relay-route": "radflow-test"}
    models = [
        {"name": "gw-gpt", "provider": "openai", "model": "gw-gpt", "extra_headers": headers},
        {"name": "gw-claude", "provider": "anthropic", "model": "gw-claude", "extra_headers": headers},
        {"name": "own", "provider": "openai", "model": "own", "base_url": "http://127.0.0.1:9/v1",
         "max_retries": 0},
    ]  # fmt: skip
    settings = Settings.model_validate({"language": "en", "gateway": gateway, "models": models})
    [[gpt, claude, own]] = asyncio.run(read_many(settings, 1, offset=900))
    stats = simulator.stats()
    assert gpt.ok and claude.ok and gpt.endpoint_host == claude.endpoint_host == "127.0.0.1"
    assert claude.response_model == "radflow-simulator/gw-claude"
    assert not own.ok and "APIConnectionError" in own.error  # its own base_url won
    for name in ("gw-gpt", "gw-claude"):
        assert "x-relay-route" in stats["header_names"][name]
    assert "own" not in stats["requests"]


@pytest.mark.e2e
def test_key_from_a_prefect_secret_block(prefect_harness, simulator, monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value=TEST_KEY).save("radflow-test-model-key", overwrite=True)
    monkeypatch.delenv(KEY_ENV)
    model = sim_model(
        simulator, "anthropic", api_key_env=None, api_key_block="radflow-test-model-key"
    )
    [[reading]] = asyncio.run(read_many(sim_settings(model), 1, offset=950))
    assert reading.ok and TEST_KEY not in reading.model_dump_json()


# ---- the screening flow with injected faults ------------------------------------------------

FAULTS = "429:0.1,500:0.08,malformed:0.04,timeout:0.01,refusal:0.02"  # 25 % of requests


@pytest.mark.e2e
def test_screen_with_25_percent_faults_reports_everything_once(
    prefect_harness, simulator, tmp_path
):
    source = tmp_path / "studies"
    build_sample_folder(source, synthetic=24, real=False, junk=False)
    dest = tmp_path / "out"
    with running_simulator(
        "--faults", FAULTS, "--seed", "11", "--latency", "0.05", "--retry-after", "0.2"
    ) as faulty:
        limits = {"max_concurrency": 3, "max_retries": 6, "timeout_seconds": 2}
        models = [
            sim_model(faulty, "openai", name="gpt-4o", fallback=sim_model(simulator, "openai", "b1"),
                   **limits),
            sim_model(faulty, "anthropic", name="claude",
                   fallback=sim_model(simulator, "anthropic", "b2"), **limits),
        ]  # fmt: skip
        config = tmp_path / "radflow.yaml"
        config.write_text(yaml.safe_dump({"language": "en", "models": models}))
        first = asyncio.run(screen(str(source), str(dest), str(config)))
        stats = faulty.stats()
        reports = read_reports(dest)
        second = asyncio.run(screen(str(source), str(dest), str(config), force=True))
        after = faulty.stats()

    # every study reported once, complete or degraded; one reading per panel entry
    assert first.studies == first.reported == len(reports) == 24 and first.errors == 0
    assert all(r.status in ("complete", "degraded") for r in reports.values())
    assert all([x.model for x in r.readings] == ["gpt-4o", "claude"] for r in reports.values())
    assert first.degraded == sum(r.status == "degraded" for r in reports.values())
    # the faults really happened and were survived
    assert sum(stats["injected"].values()) / sum(stats["requests"].values()) >= 0.2
    readings = [x for r in reports.values() for x in r.readings]
    assert any(x.requests > 1 for x in readings) and any(x.reasked for x in readings)
    # never more in flight than configured
    assert max(stats["peak_in_flight"].values()) <= 3
    # no study read twice: the faulty server answered at most each primary ask and its re-ask
    assert sum(stats["answered"].values()) <= 48 + sum(x.reasked for x in readings)
    # costs summed: readings → report → run
    for r in reports.values():
        assert r.cost_usd == pytest.approx(sum(x.cost_usd for x in r.readings), abs=1e-6)
    assert first.cost_usd == pytest.approx(sum(r.cost_usd for r in reports.values()), abs=1e-5)
    assert first.model_calls == 48 and first.cache_hits == 0
    assert first.requests == sum(x.requests for x in readings)
    run = RunSummary.model_validate_json((dest / "runs" / f"{first.run_id}.json").read_text())
    assert run.cost_usd == first.cost_usd
    # with a fallback every reading succeeded (first run complete), at least one via fallback
    assert all(x.ok for x in readings) and first.degraded == 0
    assert any(x.fallback for x in readings)
    # the rerun with --force pays for nothing: every reading comes from the cache
    assert after["requests"] == stats["requests"]
    assert second.reported == 24 and second.cache_hits == 48 and second.model_calls == 0
    assert second.cost_usd == 0 and second.requests == 0
    assert second.cached_cost_usd == pytest.approx(first.cost_usd, abs=1e-5)
    rerun = [Report.model_validate_json(p.read_text()) for p in dest.glob("studies/*/report.json")]
    assert all(x.cached for r in rerun for x in r.readings)
    injected = ", ".join(f"{n} {k}" for k, n in sorted(stats["injected"].items()))
    print(
        f"\nRELIABILITY provider faults: {sum(stats['requests'].values())} requests, "
        f"{injected} injected → {first.reported}/{first.studies} studies reported "
        f"({first.degraded} degraded), none twice, {sum(bool(x.fallback) for x in readings)} "
        f"readings by the fallback; rerun: {second.cache_hits} cache hits, 0 requests"
    )


@pytest.mark.e2e
def test_fallback_gets_images_sized_for_its_own_provider():
    import base64

    # own simulators: the session one's recorded bodies are checked by other tests
    with (
        running_simulator("--faults", "refusal:1") as sim,
        running_simulator("--record-bodies") as clean,
    ):
        backup = sim_model(clean, "openai", name="backup", model="sized-backup")
        settings = sim_settings(sim_model(sim, "anthropic", fallback=backup))
        sized = {"anthropic": [tiny_png(970)], "openai": [tiny_png(971)]}

        async def read() -> list[ModelReading]:
            panel = Panel(settings)
            try:
                return await panel.read(sized, CONTEXT, PROMPT)
            finally:
                await panel.aclose()

        [served] = asyncio.run(read())
        bodies = clean.bodies()
    assert served.ok and served.fallback == "backup"
    [body] = bodies["sized-backup"]
    assert base64.b64encode(tiny_png(971)).decode() in body
    assert base64.b64encode(tiny_png(970)).decode() not in body
