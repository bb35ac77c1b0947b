"""The provider comparison (tasks/screening/compare.py): counts per model from real reports,
latency percentiles from mergeable buckets, shards that add up to the unsharded run,
`radflow runs compare` with its plot; and `radflow screen --estimate` against the usage the
simulator reports (e2e)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.runs_cli import _COLUMNS
from tasks.core.privacy import LogNames
from tasks.core.schema import ModelReading, ModelStats, RunSummary
from tasks.screening.compare import (
    add_report,
    bucket_of,
    comparison_rows,
    cost_note,
    latency_percentile,
    merge_models,
)
from tasks.screening.monitor import summary_markdown
from tasks.screening.summary import StudyOutcome, Tally
from tests.helpers import make_report, run_screen, sim_calls, sim_config

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def _reading(model: str, abnormal: bool | None, latency_ms: float, **fields) -> ModelReading:
    values = dict(
        model=model,
        provider="anthropic" if model == "claude" else "openai",
        model_id={"claude": "claude-sonnet-4-6"}.get(model, model),
        endpoint_host="gw.example",
        ok=abnormal is not None and not fields.get("refusal"),
        abnormal=abnormal,
        input_tokens=1000,
        estimated_image_tokens=765,
        output_tokens=100,
        cost_usd=0.004,
        latency_ms=latency_ms,
        requests=1,
    )
    return ModelReading(**(values | fields))


def _study(i: int, rng: random.Random) -> list[ModelReading]:
    """Study ``i``: gpt-4o always answers (abnormal on even studies), one retry in five;
    claude agrees except on every third study, refuses every seventh, and is cached on
    every fifth."""
    gpt = _reading("gpt-4o", i % 2 == 0, rng.uniform(200, 2000), requests=2 if i % 5 else 1)
    if i % 7 == 0:
        claude = _reading("claude", None, rng.uniform(500, 900), refusal=True, error="refused")
    else:
        abnormal = (i % 2 == 0) != (i % 3 == 0)
        claude = _reading("claude", abnormal, rng.uniform(500, 900), cached=i % 5 == 0)
    return [gpt, claude]


def _summary(run_id: str) -> RunSummary:
    return RunSummary(run_id=run_id, source="s3://in/", dest="s3://out/", started_at=NOW)


def test_counts_per_model_from_reports():
    rng = random.Random(0)
    models: dict[str, ModelStats] = {}
    studies = [_study(i, rng) for i in range(1, 36)]
    for i, readings in enumerate(studies, 1):
        add_report(models, make_report(f"1.2.{i}", readings))
    gpt, claude = models["gpt-4o"], models["claude"]
    assert (gpt.provider, gpt.model_id, gpt.endpoint_host) == ("openai", "gpt-4o", "gw.example")
    assert gpt.calls == gpt.answered == 35 and gpt.failed == gpt.refused == 0
    assert gpt.requests == 35 + 28 and gpt.retried == 28  # i % 5 != 0: 28 studies retried
    assert claude.refused == 5  # i = 7, 14, 21, 28, 35
    assert claude.cached == 6  # i = 5, 10, 15, 20, 25, 30 (35 refused, not cached)
    assert claude.calls == 35 - 6 and claude.answered == 35 - 6 - 5
    assert claude.input_tokens == 1000 * claude.calls and claude.image_tokens == 765 * claude.calls
    assert claude.cost_usd == pytest.approx(0.004 * claude.calls)
    row = {r["model"]: r for r in comparison_rows(models)}["claude"]
    assert row["cost_per_study_usd"] == pytest.approx(0.004)
    # agreement: with two models a split vote goes to the weighted tie rule; each model's
    # agreement is the share of its readings on the consensus side
    for name, stats in models.items():
        agreed = compared = 0
        for i, readings in enumerate(studies, 1):
            mine = next(r for r in readings if r.model == name)
            consensus = make_report(f"1.2.{i}", readings).consensus.abnormal
            if mine.ok and consensus is not None:
                compared += 1
                agreed += mine.abnormal == consensus
        assert (stats.compared, stats.agreed) == (compared, agreed)
        assert 0 < stats.agreed < stats.compared


def _unknown_cost_run(tmp_path: Path) -> Path:
    """A run summary of 12 studies: gpt-4o's answers on every third study had no usage (cost
    unknown), claude's never had any; written where `radflow runs compare` reads it."""
    rng = random.Random(5)
    tally = Tally(_summary("run-partial"), LogNames())
    no_usage = dict(cost_usd=None, cost_known=False, input_tokens=0, output_tokens=0)
    for i in range(1, 13):
        gpt = _reading("gpt-4o", True, rng.uniform(200, 900), cost_usd=0.002 * i)
        if i % 3 == 0:
            gpt = gpt.model_copy(update=no_usage)
        claude = _reading("claude", True, rng.uniform(200, 900), **no_usage)
        report = make_report(f"1.2.{i}", [gpt, claude])
        tally.add(StudyOutcome(report.study_instance_uid, report))
    path = tmp_path / "runs" / "run-partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tally.finish().model_dump_json())
    return path


def test_cost_per_study_is_over_the_calls_whose_cost_is_known(tmp_path):
    run = RunSummary.model_validate_json(_unknown_cost_run(tmp_path).read_text())
    rows = {r["model"]: r for r in comparison_rows(run.models)}
    gpt, claude = rows["gpt-4o"], rows["claude"]
    known = [0.002 * i for i in range(1, 13) if i % 3]
    assert (gpt["calls"], gpt["cost_known"]) == (12, 8)
    assert gpt["cost_usd"] == pytest.approx(sum(known))
    assert gpt["cost_per_study_usd"] == pytest.approx(sum(known) / 8)  # not / 12
    assert (claude["calls"], claude["cost_known"]) == (12, 0)
    assert claude["cost_usd"] is None and claude["cost_per_study_usd"] is None  # not $0
    assert cost_note(gpt) == " (8 of 12 calls)" and cost_note(claude) == " (0 of 12 calls)"
    # all calls' cost known: nothing to mark; no call at all (all cached): no cost per study
    full = ModelStats(calls=4, cost_usd=0.02)
    cached = ModelStats(readings=3, cached=3)
    [full_row, cached_row] = comparison_rows({"full": full, "cached": cached})
    assert full_row["cost_per_study_usd"] == pytest.approx(0.005) and cost_note(full_row) == ""
    assert cached_row["cost_usd"] == 0 and cached_row["cost_per_study_usd"] is None

    # the Markdown summary (the screen-summary artifact): the run's cost and each model's
    summary_md = summary_markdown(run, [], "runs/run-partial.json", LogNames())
    lines = summary_md.splitlines()
    run_row = lines[next(i for i, line in enumerate(lines) if "model calls" in line) + 2]
    assert run_row.endswith(f" | {sum(known):.4f} (8 of 24 calls) |")
    model_rows = {line.split(" | ")[0]: line for line in summary_md.splitlines()}
    assert f" | {sum(known):.4f} (8 of 12 calls) | " in model_rows["| gpt-4o"]
    assert " | - (0 of 12 calls) | " in model_rows["| claude"]


def test_runs_compare_marks_a_partial_cost(tmp_path):
    path = _unknown_cost_run(tmp_path)
    plot = tmp_path / "partial.png"
    result = CliRunner().invoke(app, ["runs", "compare", str(path), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    cells = {}
    for line in result.output.splitlines():
        row = [c.strip() for c in line.strip("│ ").split("│")]
        if len(row) > 2 and row[1] in ("gpt-4o", "claude"):
            cells[row[1]] = row
    headings = [h for _, h in [("run", "run"), *_COLUMNS]]
    gpt = dict(zip(headings, cells["gpt-4o"], strict=True))
    claude = dict(zip(headings, cells["claude"], strict=True))
    per_study = sum(0.002 * i for i in range(1, 13) if i % 3) / 8
    assert gpt["$/study"] == f"{per_study:.4g} (8 of 12 calls)"
    assert claude["cost $"] == claude["$/study"] == "- (0 of 12 calls)"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_percentiles_from_buckets_are_within_five_percent():
    rng = random.Random(7)
    latencies = [rng.lognormvariate(6.5, 0.8) for _ in range(5000)]
    stats = ModelStats()
    for ms in latencies:
        add_report({"m": stats}, make_report("1.2.3", [_reading("m", True, ms)]))
    exact = sorted(latencies)
    for q in (0.5, 0.95):
        truth = exact[int(q * len(exact)) - 1]
        assert latency_percentile(stats, q) == pytest.approx(truth, rel=0.05)
    assert stats.latency_max_ms == round(max(latencies), 1)
    assert len(stats.latency_buckets) <= bucket_of(600_000) + 1  # bounded by 10 minutes
    assert latency_percentile(ModelStats(), 0.5) is None


def test_shards_add_up_to_the_unsharded_run():
    rng = random.Random(3)
    reports = [make_report(f"1.2.{i}", _study(i, rng)) for i in range(1, 31)]
    whole = Tally(_summary("whole"), LogNames())
    for report in reports:
        whole.add(StudyOutcome(report.study_instance_uid, report))
    parent = Tally(_summary("parent"), LogNames())
    for part in (reports[:11], reports[11:12], reports[12:]):
        shard = Tally(_summary("shard"), LogNames())
        for report in part:
            shard.add(StudyOutcome(report.study_instance_uid, report))
        # through the run summary file, as a parent reads a shard's
        parent.merge(RunSummary.model_validate_json(shard.finish().model_dump_json()))
    assert parent.summary.models == whole.summary.models
    for q in (0.5, 0.95):
        for name in whole.summary.models:
            assert latency_percentile(parent.summary.models[name], q) == latency_percentile(
                whole.summary.models[name], q
            )
    # merging does not alias the shard's stats
    merged: dict[str, ModelStats] = {}
    merge_models(merged, whole.summary.models)
    merge_models(merged, whole.summary.models)
    assert merged["gpt-4o"].calls == 2 * whole.summary.models["gpt-4o"].calls


def _write_run(path: Path, run_id: str, seed: int) -> Path:
    rng = random.Random(seed)
    tally = Tally(_summary(run_id), LogNames())
    for i in range(1, 13):
        report = make_report(f"1.2.{i}", _study(i, rng), simulated=True)
        tally.add(StudyOutcome(report.study_instance_uid, report))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tally.finish().model_dump_json())
    return path


def test_runs_compare_prints_every_run_and_plots(tmp_path):
    direct = _write_run(tmp_path / "direct" / "runs" / "run-direct.json", "run-direct", 1)
    gateway = _write_run(tmp_path / "gw" / "runs" / "run-gateway.json", "run-gateway", 2)
    plot = tmp_path / "plots" / "compare.png"
    result = CliRunner().invoke(
        app, ["runs", "compare", str(direct), str(gateway), "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "SIMULATED" in lines[0]
    for run in ("run-direct", "run-gateway"):
        rows = [line for line in lines if run in line]
        assert len(rows) == 2 and any("gpt-4o" in r for r in rows)
        assert any("claude-sonnet-4-6" in r for r in rows)
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_runs_compare_names_a_bad_summary(tmp_path):
    bad = tmp_path / "runs" / "x.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"run_id": "x"}))
    result = CliRunner().invoke(app, ["runs", "compare", str(bad), str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert f'"{bad}" is not a run summary' in result.output
    missing = CliRunner().invoke(app, ["runs", "compare", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "no such run summary" in missing.output


@pytest.mark.e2e
def test_estimate_calls_no_model_and_is_within_five_percent_of_the_usage(
    prefect_harness, simulator, samples, tmp_path
):
    """The simulator counts usage on its own (simulator/server.py: every text part at one
    token per 4 UTF-8 bytes, every image by decoding it with PIL and its own copy of the
    providers' formulas in simulator/vision.py); radflow's estimate counts the requests it
    would build with tasks/imaging/sizing.py (o200k_base for OpenAI text)."""
    from flows.screen import screen

    config = sim_config(simulator, tmp_path, language="en")
    dest = tmp_path / "out"
    before = sim_calls(simulator)
    proc = run_screen(samples, dest, config, "--estimate", api_url=prefect_harness)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sim_calls(simulator) == before  # no model called
    assert not (dest / "studies").exists() and not (dest / "runs").exists()
    estimated = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 12 and cells[0] in ("gpt-4o", "claude", "total"):
            estimated[cells[0]] = (int(cells[4]), int(cells[8]), float(cells[9]))
    assert set(estimated) == {"gpt-4o", "claude", "total"}, proc.stdout

    summary = asyncio.run(screen(str(samples), str(dest), str(config)))
    assert summary.reported == 8
    run = RunSummary.model_validate_json((dest / "runs" / f"{summary.run_id}.json").read_text())
    for name, (calls, tokens, cost) in estimated.items():
        if name == "total":
            continue
        stats = run.models[name]
        assert stats.calls == calls == 8 and stats.answered == 8
        assert tokens == pytest.approx(stats.input_tokens, rel=0.05)
        price = {"gpt-4o": 2.5, "claude": 3.0}[name]
        assert cost == pytest.approx(stats.input_tokens * price / 1e6, rel=0.05, abs=1e-4)
    total = sum(s.input_tokens for s in run.models.values())
    assert estimated["total"][1] == pytest.approx(total, rel=0.05)

    # after the run: nothing left to read, unless forced
    from tasks.core.config import load_settings
    from tasks.screening.estimate import estimate_run

    settings = load_settings(config)
    again = estimate_run(str(samples), str(dest), settings)
    assert again.to_read == 0 and [m.calls for m in again.models] == [0, 0]
    # forced: every study read again, every reading from the cache (as the run would)
    forced = estimate_run(str(samples), str(dest), settings, force=True)
    assert forced.to_read == 8 and [(m.cached, m.calls) for m in forced.models] == [(8, 0)] * 2
    assert sum(m.max_cost_usd for m in forced.models) == 0
    assert sim_calls(simulator) == before + 16

    # the same comparison as the run's table artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def artifacts():
        async with get_client() as client:
            flow_run = ArtifactFilterFlowRunId(any_=[summary.run_id])
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=flow_run))

    table = next(a for a in asyncio.run(artifacts()) if a.key == "screen-models")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows == comparison_rows(run.models)
    assert "SIMULATED" in (table.description or "")


def test_estimate_counts_each_models_request(samples, tmp_path):
    from tasks.core.config import Settings
    from tasks.imaging.sizing import anthropic_image_tokens, openai_image_tokens
    from tasks.screening.estimate import estimate_run

    settings = Settings()  # the built-in panel: gpt-4o and claude-sonnet-4-6, no key needed
    estimate = estimate_run(str(samples), str(tmp_path / "out"), settings, limit=3)
    assert (estimate.studies, estimate.to_read, estimate.unreadable) == (3, 3, 0)
    gpt, claude = estimate.models
    assert gpt.cfg.provider.value == "openai" and claude.cfg.provider.value == "anthropic"
    assert gpt.calls == claude.calls == 3 and gpt.images == claude.images >= 3
    # per image at least the provider's smallest charge; the two rules differ
    assert gpt.image_tokens >= gpt.images * openai_image_tokens(1, 1)
    assert claude.image_tokens >= claude.images * anthropic_image_tokens(1, 1)
    assert gpt.image_tokens != claude.image_tokens
    assert gpt.text_tokens > 100 * gpt.calls  # the system prompt, once per request
    assert gpt.input_cost_usd == pytest.approx(gpt.input_tokens * 2.5 / 1e6)
    assert claude.max_cost_usd == pytest.approx(
        (claude.input_tokens * 3.0 + 3 * claude.cfg.max_output_tokens * 15.0) / 1e6
    )


@pytest.mark.e2e
def test_runs_compare_reads_summaries_on_s3(moto_server, tmp_path):
    import boto3

    local = _write_run(tmp_path / "runs" / "run-local.json", "run-local", 4)
    remote = _write_run(tmp_path / "upload" / "run-s3.json", "run-s3", 5)
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="compare-runs")
    s3.put_object(Bucket="compare-runs", Key="out/runs/run-s3.json", Body=remote.read_bytes())
    uri = "s3://compare-runs/out/runs/run-s3.json"
    result = CliRunner().invoke(app, ["runs", "compare", uri, str(local)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum("run-s3" in line for line in lines) == 2 == sum("run-local" in x for x in lines)
    missing = CliRunner().invoke(app, ["runs", "compare", "s3://compare-runs/out/runs/x.json"])
    assert missing.exit_code == 2 and "no such run summary" in missing.output
