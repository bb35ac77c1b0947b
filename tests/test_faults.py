"""How radflow handles what real providers do, each fault injected by the simulator over HTTP
through the real SDKs: refusals (structured and in plain text), answers cut at max_tokens,
Anthropic's 529, rejected images, gateways without json_schema, answers without usage, and
rejected keys or model ids, which stop the run (docs/models.md, "Provider behaviour")."""

from __future__ import annotations

import asyncio
import json
import typing

import anthropic
import openai
import pytest
import yaml

from flows.screen import screen
from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tasks.core.config import Settings
from tasks.core.errors import ProviderRejected
from tasks.core.schema import RunSummary
from tasks.models.answers import plain_refusal, refused_error
from tasks.models.panel import Panel, load_prompt
from tests.helpers import (
    KEY_ENV,
    TEST_KEY,
    read_errors,
    read_many,
    read_reports,
    run_screen,
    sim_config,
    sim_model,
    sim_settings,
    tiny_png,
)

PROVIDERS = ["openai", "anthropic"]


def _one(sim, provider: str, model: str, offset: int = 0, **extra):
    """One reading by ``model`` (a FAULTY_MODELS id) over ``provider``'s protocol."""
    settings = sim_settings(sim_model(sim, provider, model=model, **extra))
    [[reading]] = asyncio.run(read_many(settings, 1, offset=offset))
    return reading


def _literals(tp: object) -> set[str]:
    out: set[str] = set()
    for arg in typing.get_args(tp):
        out |= {arg} if isinstance(arg, str) else _literals(arg)
    return out


# ---- pure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't provide a diagnosis from medical images.",
        "I cannot interpret this scan. Please consult a qualified radiologist.",
        "As an AI, I am unable to provide medical advice.",
        "죄송하지만 진단을 제공해 드릴 수 없습니다.",
    ],
)
def test_plain_text_refusals_are_recognised(text):
    assert plain_refusal(text) == text


@pytest.mark.parametrize(
    "text", ['{"abnormal": true, "findings": [', "Findings: a 2 cm nodule in the right lung.", ""]
)
def test_other_invalid_answers_are_not_refusals(text):
    assert plain_refusal(text) is None


def test_refusal_error_is_truncated_and_redacted():
    from tasks.core.redact import register

    register("sk-secret-value-123456")
    error = refused_error("I can't. " * 100 + "sk-secret-value-123456")
    assert error.startswith("refused: I can't. I can't.") and error.endswith("…")
    assert len(error) <= len("refused: ") + 300
    assert "sk-secret" not in refused_error("I can't help, key sk-secret-value-123456")


def test_default_and_documented_model_ids_exist_in_the_sdks():
    known = _literals(openai.types.ChatModel) | _literals(anthropic.types.Model)
    defaults = {m.model for m in Settings().models}
    assert defaults and defaults <= known, defaults - known
    assert {"gpt-4o", "claude-sonnet-4-6"} <= known  # the ids docs/models.md names


# ---- each fault through the SDKs over HTTP ----------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", ["refuses", "refuses-in-text"])
def test_refusal_fails_the_reading_counted_and_not_retried(faulty_simulator, provider, model):
    reading = _one(faulty_simulator, provider, model)
    assert not reading.ok and reading.refusal and not reading.reasked
    assert reading.requests == 1  # neither re-asked nor retried
    assert reading.error.startswith("refused: ")
    assert "can't" in reading.error and "SIMULATED" in reading.error
    assert "InvalidAnswer" not in reading.error


@pytest.mark.e2e
@pytest.mark.parametrize("provider", PROVIDERS)
def test_answer_cut_at_max_tokens_is_a_clear_failure(faulty_simulator, provider):
    reading = _one(faulty_simulator, provider, "cut-short", max_output_tokens=256)
    assert not reading.ok and reading.cut and not reading.refusal and not reading.reasked
    assert reading.error == (
        "output cut at max_output_tokens=256: raise models[].max_output_tokens"
    )
    assert reading.requests == 1 and reading.output_tokens == 256  # paid for, and counted


@pytest.mark.e2e
def test_anthropic_529_overloaded_is_retried_then_fails(faulty_simulator):
    before = faulty_simulator.stats()["requests"].get("overloaded", 0)
    reading = _one(faulty_simulator, "anthropic", "overloaded", max_retries=2)
    after = faulty_simulator.stats()["requests"]["overloaded"]
    assert not reading.ok and reading.requests == 3 and after - before == 3
    assert "OverloadedError" in reading.error or "529" in reading.error
    assert "Overloaded" in reading.error


@pytest.mark.e2e
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rejected_image_fails_that_reading_only(faulty_simulator, provider):
    models = [
        sim_model(faulty_simulator, provider, name="picky", model="rejects-image", max_retries=2),
        sim_model(faulty_simulator, provider, name="fine", model="fine"),
    ]
    [[picky, fine], [again, _]] = asyncio.run(read_many(sim_settings(*models), 2, offset=10))
    assert not picky.ok and picky.requests == 1  # a 400: never retried
    assert picky.error.startswith("image rejected by the provider (not retried): ")
    assert "image exceeds 5 MB maximum" in picky.error
    assert not again.ok and fine.ok  # every study's reading fails alone; the others read


@pytest.mark.e2e
def test_no_usage_means_unknown_cost_not_zero(faulty_simulator):
    for provider in PROVIDERS:
        reading = _one(faulty_simulator, provider, "no-usage", offset=20)
        assert reading.ok and not reading.cost_known and reading.cost_usd is None
    known = _one(faulty_simulator, "openai", "has-usage", offset=20)
    assert known.cost_known and known.cost_usd > 0


@pytest.mark.e2e
def test_auto_structured_output_falls_back_to_json_mode_once(faulty_simulator):
    settings = sim_settings(sim_model(faulty_simulator, "openai", model="no-json-schema"))

    async def three() -> list:
        panel = Panel(settings)
        try:
            return [
                (await panel.read([tiny_png(30 + i)], {"modality": "CT"}, load_prompt("en")))[0]
                for i in range(3)
            ]
        finally:
            await panel.aclose()

    readings = asyncio.run(three())
    bodies = [json.loads(b) for b in faulty_simulator.bodies()["no-json-schema"][-4:]]
    assert all(r.ok and r.abnormal is not None for r in readings)
    formats = [b["response_format"]["type"] for b in bodies]
    assert formats == ["json_schema", "json_object", "json_object", "json_object"]
    assert [r.requests for r in readings] == [2, 1, 1]  # detected once, remembered
    assert "JSON schema" in bodies[1]["messages"][0]["content"]  # the schema is in the prompt


@pytest.mark.e2e
def test_strict_json_schema_does_not_fall_back(faulty_simulator):
    reading = _one(faulty_simulator, "openai", "no-json-schema", structured_output="json_schema")
    assert not reading.ok and "BadRequestError" in reading.error and reading.requests == 1


@pytest.mark.e2e
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("bad-key", f"rejected the API key from env var {KEY_ENV}"),
        ("forbidden", f"refused the API key for this model from env var {KEY_ENV}"),
        ("unknown-model", 'does not know model id "unknown-model"'),
    ],
)
def test_rejected_key_or_model_stops_every_reader(faulty_simulator, provider, model, says):
    settings = sim_settings(
        sim_model(faulty_simulator, provider, name="broken", model=model),
        sim_model(faulty_simulator, provider, name="fine", model="fine"),
    )

    async def run() -> tuple[ProviderRejected, int]:
        panel = Panel(settings)
        try:
            with pytest.raises(ProviderRejected) as first:
                await panel.read([tiny_png(40)], {}, load_prompt("en"))
            seen = faulty_simulator.stats()["requests"][model]
            with pytest.raises(ProviderRejected):  # no call any more
                await panel.read([tiny_png(41)], {}, load_prompt("en"))
            return first.value, faulty_simulator.stats()["requests"][model] - seen
        finally:
            await panel.aclose()

    error, later = asyncio.run(run())
    line = str(error)
    assert 'model "broken"' in line and says in line and "\n" not in line
    assert TEST_KEY not in line and later == 0


# ---- the screening flow ---------------------------------------------------------------------


@pytest.mark.e2e
def test_bad_key_stops_the_run_and_a_rerun_reads_everything(prefect_harness, tmp_path):
    source, dest = tmp_path / "studies", tmp_path / "out"
    build_sample_folder(source, synthetic=12, real=False, junk=False)
    config = tmp_path / "radflow.yaml"
    with running_simulator("--faults", "401:1@claude-sonnet-4-6,no_usage:1@gpt-4o") as sim:
        models = [sim_model(sim, "openai", name="gpt"), sim_model(sim, "anthropic", name="claude")]
        options = {"language": "en", "models": models, "max_studies_in_flight": 2}
        config.write_text(yaml.safe_dump(options))
        with pytest.raises(ProviderRejected) as stopped:
            asyncio.run(screen(str(source), str(dest), str(config)))
        calls = sim.stats()["requests"]["claude-sonnet-4-6"]
        assert 'model "claude"' in str(stopped.value) and KEY_ENV in str(stopped.value)
        assert not read_reports(dest)  # no study marked done: no report, not even degraded
        assert calls < 12  # stopped early, not a call per study
        errors = read_errors(dest)
        assert errors and all("ProviderRejected" in e["reason"] for e in errors)
        [summary_file] = (dest / "runs").glob("*.json")
        assert 'model "claude"' in json.loads(summary_file.read_text())["stopped"]

        # the key fixed (here: claude through a healthy model id), the rerun reads them all
        models[1]["model"] = "claude-fixed"
        config.write_text(yaml.safe_dump(options))
        summary = asyncio.run(screen(str(source), str(dest), str(config)))
    assert summary.reported == 12 and summary.stopped is None and summary.skipped == 0
    reports = read_reports(dest)
    paid_gpt = sum(not r.readings[0].cached for r in reports.values())
    assert paid_gpt >= 10 and summary.unknown_cost_readings == paid_gpt  # gpt's: no usage
    assert all(not r.readings[0].cost_known and r.readings[1].cost_known for r in reports.values())
    assert summary.cost_usd == pytest.approx(
        sum(r.readings[1].cost_usd for r in reports.values()), abs=1e-5
    )


@pytest.mark.e2e
def test_bad_key_in_one_shard_stops_the_whole_sharded_run(prefect_harness, tmp_path):
    """Four shards of three, one at a time: the first shard's rejected key stops the parent
    (same error, exit as a single run), no further shard starts, every study has its error
    record, none a report."""
    source, dest = tmp_path / "studies", tmp_path / "out"
    build_sample_folder(source, synthetic=12, real=False, junk=False)
    config = tmp_path / "radflow.yaml"
    with running_simulator("--faults", "401:1@claude-sonnet-4-6") as sim:
        models = [sim_model(sim, "openai", name="gpt"), sim_model(sim, "anthropic", name="claude")]
        runner = {"shard_size": 3, "shards_in_flight": 1}
        config.write_text(yaml.safe_dump({"language": "en", "models": models, "runner": runner}))
        with pytest.raises(ProviderRejected) as stopped:
            asyncio.run(screen(str(source), str(dest), str(config)))
        calls = sim.stats()["requests"]
    assert 'model "claude"' in str(stopped.value) and KEY_ENV in str(stopped.value)
    assert calls["claude-sonnet-4-6"] <= 3 and calls.get("gpt-4o", 0) <= 3  # the first shard's
    assert not read_reports(dest)
    errors = read_errors(dest)
    assert len({e["study_instance_uid"] for e in errors}) == 12
    parent = [
        json.loads(p.read_text())
        for p in (dest / "runs").glob("*.json")
        if json.loads(p.read_text())["shards"]
    ]
    assert len(parent) == 1 and len(parent[0]["shards"]) == 1  # no second shard started
    assert 'model "claude"' in parent[0]["stopped"] and parent[0]["errors"] >= 12


# ---- the worked gateway example of docs/models.md -------------------------------------------


@pytest.mark.e2e
def test_gateway_worked_example_reads_with_both_sdks(simulator):
    from tests.helpers import ROOT

    page = (ROOT / "docs" / "models.md").read_text()
    [block] = [b for b in page.split("```yaml\n")[1:] if "anthropic/claude" in b.split("```")[0]]
    example = yaml.safe_load(block.split("```")[0])
    example["gateway"] = {"base_url": simulator.url, "api_key_env": KEY_ENV}  # the relay
    settings = Settings.model_validate({"language": "en", **example})
    before = simulator.stats()["requests"]
    [[gpt, claude, via_openai]] = asyncio.run(read_many(settings, 1, offset=60))
    after = simulator.stats()["requests"]
    assert gpt.ok and claude.ok and via_openai.ok
    assert via_openai.provider == "openai" and via_openai.model_id == "anthropic/claude-sonnet-4-6"
    assert via_openai.response_model == "radflow-simulator/anthropic/claude-sonnet-4-6"
    for model_id in ("gpt-4o", "claude-sonnet-4-6", "anthropic/claude-sonnet-4-6"):
        assert after[model_id] - before.get(model_id, 0) == 1


@pytest.mark.e2e
def test_cost_per_study_over_the_calls_with_usage(prefect_harness, tmp_path):
    """Half of gpt-4o's answers without usage: its cost per study is over the others, and the
    table `radflow screen` ends with says how many calls that is."""
    from tasks.screening.compare import comparison_rows

    source, dest = tmp_path / "studies", tmp_path / "out"
    build_sample_folder(source, synthetic=10, real=False, junk=False)
    with running_simulator("--faults", "no_usage:0.5@gpt-4o") as sim:
        proc = run_screen(source, dest, sim_config(sim, tmp_path), api_url=prefect_harness)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [summary_file] = (dest / "runs").glob("*.json")
    run = RunSummary.model_validate_json(summary_file.read_text())
    gpt = [r for rep in read_reports(dest).values() for r in rep.readings if r.model == "gpt-4o"]
    known = [r.cost_usd for r in gpt if r.cost_known]
    assert len(gpt) == 10 and 0 < len(known) < 10  # the seeded draw: some of each
    row = {r["model"]: r for r in comparison_rows(run.models)}["gpt-4o"]
    assert (row["calls"], row["cost_known"]) == (10, len(known))
    assert row["cost_per_study_usd"] == pytest.approx(sum(known) / len(known), abs=1e-6)
    claude = {r["model"]: r for r in comparison_rows(run.models)}["claude"]
    assert claude["cost_known"] == claude["calls"] == 10
    table = [line for line in proc.stdout.splitlines() if "│" in line]
    [gpt_line] = [line for line in table if "gpt-4o" in line and "openai" in line]
    assert gpt_line.count(f"({len(known)} of 10 calls)") == 2  # cost $ and $/study
    [claude_line] = [line for line in table if "claude-sonnet-4-6" in line]
    assert "calls)" not in claude_line
