"""End to end: the screening flow on a real Prefect API, reading real and synthetic DICOMs,
with both SDKs calling the simulator over HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from flows.screen import screen
from tasks.core.schema import RunSummary
from tests.helpers import TEST_KEY, read_reports, run_radflow, run_screen, sim_calls, sim_config

pytestmark = pytest.mark.e2e

PHI_VALUES = (
    "SYNTHETIC^PATIENT",
    "SYN-00",
    "19700101",
    "ACC00",
    "Synthetic General Hospital",
    "SYNTHETIC CHEST CT",
    "20260101",
)


def test_screen_reports_every_study_and_reruns_for_free(
    prefect_harness, simulator, samples, tmp_path
):
    config = sim_config(simulator, tmp_path, language="en")
    dest = tmp_path / "out"
    before = sim_calls(simulator)

    summary = asyncio.run(screen(str(samples), str(dest), str(config)))

    reports = read_reports(dest)
    # 4 real pydicom-data studies + 4 synthetic ones; notes.txt is an error record
    assert len(reports) == 8 == summary.reported == summary.studies
    errors = [json.loads(p.read_text()) for p in dest.glob("errors/*.json")]
    assert [Path(e["source"]).name for e in errors] == ["notes.txt"]
    assert "not a DICOM file" in errors[0]["reason"]
    for uid, report in reports.items():
        assert report.study_instance_uid == uid
        assert report.status == "complete"
        assert [r.model for r in report.readings] == ["gpt-4o", "claude"]
        assert all(r.ok and r.simulated and r.input_tokens > 0 for r in report.readings)
        assert report.consensus.abnormal is not None
        assert report.images and all(len(i.sha256) == 64 for i in report.images)
        md = (dest / "studies" / uid / "report.md").read_text()
        assert "SIMULATED" in md and "AI-generated" in md
        for image in report.images:
            assert (dest / "studies" / uid / "images" / f"{image.sha256[:16]}.png").is_file()
    # synthetic studies with a lesion are read abnormal by at least one model
    lesion = [r for r in reports.values() if any("lesion" in s for s in r.sources)]
    assert lesion and all(any(x.abnormal for x in r.readings) for r in lesion)

    assert sim_calls(simulator) - before == 16 == summary.model_calls
    run = RunSummary.model_validate_json(next(dest.glob("runs/*.json")).read_text())
    assert run.reported == 8 and run.errors == 1 and run.cost_usd > 0 and run.simulated

    # PHI and the key never left the process towards the models, nor reached an output
    bodies = json.dumps(simulator.bodies())
    for value in PHI_VALUES:
        assert value not in bodies
    for path in dest.rglob("*"):
        if path.suffix in (".json", ".md"):
            text = path.read_text()
            assert TEST_KEY not in text
            assert "SYNTHETIC^PATIENT" not in text

    # an immediate rerun makes no model call and rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in dest.glob("studies/*/report.json")}
    again = asyncio.run(screen(str(samples), str(dest), str(config)))
    assert again.skipped == 8 and again.reported == 0 and again.model_calls == 0
    assert sim_calls(simulator) - before == 16
    assert mtimes == {p: p.stat().st_mtime_ns for p in dest.glob("studies/*/report.json")}


def test_korean_reports_and_a_failing_model_degrade(prefect_harness, simulator, samples, tmp_path):
    config = sim_config(simulator, tmp_path, language="ko")
    text = config.read_text().replace(simulator.url + "\n", "http://127.0.0.1:9\n", 1)
    config.write_text(text)  # the anthropic model now points at a closed port
    dest = tmp_path / "out"
    summary = asyncio.run(screen(str(samples), str(dest), str(config), limit=2))
    reports = read_reports(dest)
    assert len(reports) == 2 == summary.degraded
    for report in reports.values():
        ok, failed = report.readings
        assert ok.ok and not failed.ok and "APIConnectionError" in failed.error
        assert report.status == "degraded" and report.consensus.needs_review
        md = (dest / "studies" / report.study_instance_uid / "report.md").read_text()
        assert "선별 판독 보고서" in md and "시뮬레이션" in md


def test_cli_screen_against_a_compatible_server(prefect_harness, simulator, samples, tmp_path):
    config = sim_config(simulator, tmp_path)
    dest = tmp_path / "cli out"
    proc = run_screen(samples, dest, config, api_url=prefect_harness, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reported 8/8 studies" in proc.stdout
    assert "provider comparison (SIMULATED readings)" in proc.stdout
    assert "claude-sonnet-4-6" in proc.stdout and "p95 ms" in proc.stdout
    assert len(read_reports(dest)) == 8
    assert TEST_KEY not in proc.stdout + proc.stderr


def test_cli_help_lists_the_commands():
    proc = run_radflow("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for command in ("screen", "preprocess", "simulator"):
        assert command in out


def test_cli_preprocess_names_bad_inputs_and_writes_the_rest(samples, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 10)
    good = samples / "real" / "RG1_J2KI.dcm"
    proc = run_radflow("preprocess", str(bad), str(good), "--out", str(tmp_path / "png"),
                       "--max-edge", "512")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "broken.dcm" in proc.stderr
    assert (tmp_path / "png" / "RG1_J2KI.png").is_file()
    assert not (tmp_path / "png" / "broken.png").exists()


def test_cli_config_error_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("language: fr\n")
    proc = run_screen(tmp_path, tmp_path / "o", bad, api_url="http://127.0.0.1:9/api")
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "language" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failing_study_is_retried_alone_and_ends_as_error_records(
    prefect_harness, simulator, tmp_path
):
    """Three studies in one task run: one whose report folder is blocked for its first
    attempt, one blocked for good, one fine. The task run's retries screen only what is not
    done, answered model calls are not paid again, and the blocked study ends as error records
    naming it; the others are reported once each."""
    import threading

    from simulator.samples import synthetic_ct

    source, dest = tmp_path / "in", tmp_path / "out"
    uids = {
        name: f"1.2.826.0.1.3680043.10.777.{i}" for i, name in enumerate(("flaky", "bad", "ok"))
    }
    for name, uid in uids.items():
        synthetic_ct(source / f"{name}.dcm", lesion=False, seed=len(name), study_uid=uid)
    (dest / "studies").mkdir(parents=True)
    for name in ("flaky", "bad"):  # a file where the study's report folder goes
        (dest / "studies" / uids[name]).write_text("in the way")
    unblock = threading.Timer(2.0, (dest / "studies" / uids["flaky"]).unlink)  # before retry 1
    unblock.start()
    config = sim_config(simulator, tmp_path, runner={"retry_delays": [3, 1]})
    before = sim_calls(simulator)
    try:
        summary = asyncio.run(screen(str(source), str(dest), str(config)))
    finally:
        unblock.cancel()

    assert set(read_reports(dest)) == {uids["flaky"], uids["ok"]} and summary.reported == 2
    errors = [json.loads(p.read_text()) for p in dest.glob("errors/*.json")]
    assert [e["study_instance_uid"] for e in errors] == [uids["bad"]]
    assert errors[0]["kind"] == "StudyFailed" and uids["bad"] in errors[0]["reason"]
    assert summary.errors == 1
    assert sim_calls(simulator) - before == 6  # 3 studies x 2 models, retries read the cache
