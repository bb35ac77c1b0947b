"""Run names, tags, result rows and the Markdown run summary shown in the Prefect UI."""

from __future__ import annotations

from datetime import UTC, datetime

from tasks.core.privacy import LogNames
from tasks.core.schema import Consensus, Report, RunSummary, Urgency
from tasks.screening.monitor import (
    report_location,
    result_row,
    run_name,
    run_tags,
    summary_markdown,
)
from tests.helpers import make_report

PLAIN = LogNames()


def _report(uid: str, urgency: Urgency, review: bool, agreement: float = 1.0) -> Report:
    consensus = Consensus(
        abnormal=urgency != Urgency.NORMAL,
        urgency=urgency,
        score=0.5,
        agreement=agreement,
        needs_review=review,
        review_reasons=["models disagree | split"] if review else [],
    )
    return make_report(uid, consensus=consensus, cost_usd=0.0123456789)


def test_run_name_and_tags():
    day = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    assert run_name(day, 12) == "screen-2026-11-27-12-studies"
    assert run_name(day, 1) == "screen-2026-11-27-1-study"
    assert run_tags("s3://scans/in/", ["gpt-4o", "claude", "gpt-4o"]) == [
        "radflow",
        "source:s3://scans/in/",
        "model:gpt-4o",
        "model:claude",
    ]
    assert all(len(t) <= 100 for t in run_tags("x" * 500, ["m"]))


def test_result_row_and_report_location():
    row = result_row(_report("1.2.3", Urgency.FOLLOW_UP, True, 0.5), "s3://reports/", PLAIN)
    assert row == {
        "study": "1.2.3",
        "status": "complete",
        "abnormal": "yes",
        "urgency": "follow_up",
        "agreement": 0.5,
        "review": "yes",
        "reasons": "models disagree | split",
        "cost_usd": 0.012346,
        "report": "s3://reports/studies/1.2.3/report.md",
    }
    assert report_location("/data/out", "9", "report.json") == "/data/out/studies/9/report.json"


def test_summary_lists_the_review_queue_most_urgent_first():
    rows = [
        result_row(_report("a", Urgency.NORMAL, False), "/out", PLAIN),
        result_row(_report("b", Urgency.FOLLOW_UP, True, 0.5), "/out", PLAIN),
        result_row(_report("c", Urgency.IMMEDIATE, True), "/out", PLAIN),
    ]
    summary = RunSummary(
        run_id="r1",
        source="s3://scans/in/",
        dest="/out",
        studies=3,
        reported=3,
        needs_review=2,
        cost_usd=0.037,
        simulated=True,
        started_at=datetime(2026, 11, 27, tzinfo=UTC),
    )
    md = summary_markdown(summary, rows, "runs/r1.json", PLAIN)
    assert "## Review queue (2)" in md
    queue = md.split("## Review queue")[1]
    assert queue.index("| c | immediate") < queue.index("| b | follow_up")
    assert "| a |" not in queue
    assert "models disagree \\| split" in queue  # a '|' must not break the table
    assert "`/out/studies/c/report.md`" in queue
    assert "`/out/runs/r1.json`" in md and "simulator" in md
    empty = summary_markdown(summary, rows[:1], "runs/r1.json", PLAIN)
    assert "Nothing to review" in empty
    assert "## Models" not in md  # no readings counted: no comparison


def test_summary_shows_the_provider_comparison():
    from tasks.screening.compare import add_report
    from tests.helpers import make_report, panel_readings

    summary = RunSummary(
        run_id="r2", source="/in", dest="/out", started_at=datetime(2026, 12, 3, tzinfo=UTC)
    )
    for uid in ("1", "2"):
        add_report(summary.models, make_report(uid, panel_readings(disagree=uid == "1")))
    md = summary_markdown(summary, [], "runs/r2.json", PLAIN)
    models = md.split("## Models")[1].split("## Review queue")[0]
    # a split vote goes to gpt-4o's side (the tie rule), so claude agrees on one study of two
    assert "| gpt-4o | openai | - | 2 | 0 | 0 | 0 | 0 | 0.0000 | 1 |" in models
    assert "| claude | anthropic | - | 2 | 0 | 0 | 0 | 0 | 0.0000 | 0.5 |" in models


def test_with_pseudonyms_rows_and_summary_name_no_uid_and_no_source():
    names = LogNames(b"k" * 32)
    uid, source = "1.2.826.0.1.3680043.8.498.1", "s3://scans/PARK^JIMIN/"
    row = result_row(_report(uid, Urgency.IMMEDIATE, True), "s3://reports/", names)
    log_id = names.study(uid)
    assert row["study"] == log_id and len(log_id) == 16
    assert row["report"] == f"radflow lookup s3://reports/ {log_id}"
    summary = RunSummary(
        run_id="r1", source=source, dest="s3://reports/", started_at=datetime.now(UTC)
    )
    md = summary_markdown(summary, [row], "runs/r1.json", names)
    assert f"| {log_id} | immediate" in md and f"`{names.source(source)}`" in md
    assert uid not in md + str(row) and "PARK" not in md
    # stable for one key, different for another, domain-separated
    assert names.study(uid) == LogNames(b"k" * 32).study(uid) != LogNames(b"j" * 32).study(uid)
    assert names.source(source).startswith("s3-")
    assert (
        names.source(uid) == f"local-{names.source(uid)[6:]}"
        and names.source(uid)[6:] != log_id[:10]
    )
