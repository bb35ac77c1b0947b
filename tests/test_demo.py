"""`radflow demo` as a newcomer runs it (no Prefect API configured: a temporary server): the
console shows radflow's own lines and the table, no traceback, warning or Prefect chatter."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_radflow


@pytest.mark.e2e
def test_demo_prints_only_radflows_lines_and_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a first run: a new database
    out = tmp_path / "demo"
    # the real samples only (one has a one-component PatientName), no simulated latency
    run = run_radflow(
        "demo", "--out", str(out), "--synthetic", "0", "--latency", "0", "--language", "en",
        env=env, timeout=600,
    )  # fmt: skip
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    for unwanted in ("Traceback", "Warning", "WARNING", "ERROR", "| INFO", "telemetry"):
        assert unwanted not in text, (unwanted, text[-3000:])
    assert run.stderr == ""
    assert "radflow demo — SIMULATED readings" in run.stdout
    header = ("input", "modality", "consensus", "urgency", "agree", "review", "tokens", "cost $")
    (line,) = [x for x in run.stdout.splitlines() if x.split()[:1] == ["input"]]
    assert line.split() == [w for h in header for w in h.split()]
    rows = [x for x in run.stdout.splitlines() if x.split()[:1] in (["693_J2KR"], ["MR2_J2KI"])]
    assert len(rows) == 2 and "4 reports, 1 error records, 8 model calls" in run.stdout
    assert len(list(out.glob("reports/studies/*/report.sr.dcm"))) == 4


@pytest.mark.e2e  # a new Python process
def test_the_cli_gives_a_temporary_prefect_api_two_minutes_to_start():
    """CI once saw Prefect's 20 s pass while the demo's first run migrated its database."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    probe = (
        "import flows.cli; from prefect.settings import get_current_settings as s; "
        "print(s().server.ephemeral.startup_timeout_seconds)"
    )
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "120", run.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-c", probe],
        env=env | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "45"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.stdout.strip() == "45", run.stderr[-2000:]  # the user's value stays


def test_the_demo_table_marks_a_cost_it_does_not_know(tmp_path):
    from rich.console import Console

    from flows.demo import summary_table
    from tests.helpers import make_report, panel_readings

    known, unknown = panel_readings(), panel_readings()
    for r in known + unknown:
        r.cost_usd = 0.0021
    unknown[1].cost_usd, unknown[1].cost_known = None, False  # an answer without usage
    for uid, readings, cost in (("1.2.3", known, 0.0042), ("1.2.4", unknown, 0.0021)):
        path = tmp_path / "studies" / uid / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(make_report(uid, readings, cost_usd=cost).model_dump_json())
    console = Console(record=True, width=120)
    console.print(summary_table(tmp_path))
    rows = {line.split()[0]: line.split()[-1] for line in console.export_text().splitlines()
            if line.strip().startswith("1.2.")}  # fmt: skip
    assert rows == {"1.2.3": "0.0042", "1.2.4": "0.0021+?"}
