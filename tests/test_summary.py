"""A screening run's accounting (tasks/screening/summary.py), and what it reads, how it shards
and what it records for what it could not (tasks/screening/plan.py): plain functions on real
reports and a local DEST."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tasks.core.privacy import LogNames
from tasks.core.schema import (
    Consensus,
    ErrorRecord,
    Impression,
    ModelReading,
    Published,
    Report,
    RunSummary,
    Urgency,
)
from tasks.ingest.discover import Instance, Study
from tasks.pacs.publish import PublishTarget
from tasks.pacs.settings import DicomWebConfig
from tasks.reports.write import report_key
from tasks.screening.plan import (
    already_reported,
    fail_unread,
    fail_unreported,
    plan_shards,
    to_read,
)
from tasks.screening.summary import StudyOutcome, Tally, study_cost
from tasks.storage import LocalStore, ObjectRef

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _summary(run_id: str = "r", **counts) -> RunSummary:
    return RunSummary(run_id=run_id, source="s3://in/", dest="s3://out/", started_at=NOW, **counts)


def _reading(model: str, abnormal: bool | None, *, cached: bool = False, cost: float = 0.01):
    return ModelReading(
        model=model,
        provider="openai",
        model_id=model,
        ok=abnormal is not None,
        abnormal=abnormal,
        input_tokens=1000,
        estimated_input_tokens=900,
        output_tokens=100,
        cost_usd=cost,
        requests=2,
        cached=cached,
    )


def _report(uid: str, readings: list[ModelReading], **fields) -> Report:
    review = fields.pop("review", False)
    return Report(
        study_instance_uid=uid,
        status="complete" if all(r.ok for r in readings) else "degraded",
        language="en",
        consensus=Consensus(
            abnormal=True,
            urgency=Urgency.FOLLOW_UP,
            score=0.5,
            agreement=0.5,
            needs_review=review,
            review_reasons=["models disagree"] if review else [],
        ),
        readings=readings,
        images=[],
        inputs_fingerprint="f",
        prompt_version="v1",
        radflow_version="0",
        **fields,
    )


def _impression(**usage) -> Impression:
    """The synthesis call's narrative, with its tokens and cost."""
    model = {"model": "s", "provider": "openai", "model_id": "s", "prompt_version": "1"}
    return Impression(ok=True, language="en", **model, **usage)


def _study(uid: str, n: int = 2) -> Study:
    instances = [
        Instance(
            ObjectRef(f"/d/{uid}/{i}.dcm", f"{uid}/{i}.dcm", 1, "1"),
            uid,
            uid + ".1",
            f"{uid}.1.{i}",
            "CT",
            i,
            1,
            {},
        )
        for i in range(n)
    ]
    return Study(uid, instances)


def test_plan_shards_covers_every_study_once():
    studies = [_study(f"1.{i}", i % 3 + 1) for i in range(10)]
    shards = plan_shards(studies, 4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [s for shard in shards for s in shard] == studies  # each once, in order
    with pytest.raises(ValueError, match="shard size must be >= 1, got 0"):
        plan_shards(studies, 0)


def test_a_study_cost_counts_every_reading_and_the_synthesis():
    impression = _impression(cost_usd=0.0025)
    readings = [_reading("a", True, cost=0.01), _reading("b", True, cached=True, cost=0.02)]
    assert study_cost(readings, impression) == 0.0325
    assert study_cost(readings, None) == 0.03
    assert study_cost([], None) == 0


def test_tally_adds_paid_and_cached_readings_synthesis_review_and_publishing():
    impression = _impression(input_tokens=50, output_tokens=20, cost_usd=0.004)
    published = Published(
        state="failed",
        target="dicomweb+http://p/",
        series_instance_uid="1",
        sop_instance_uid="2",
        version="v",
    )
    first = _report(
        "1.1",
        [_reading("a", True, cost=0.01), _reading("b", False, cached=True, cost=0.02)],
        review=True,
        impression=impression,
        fetched_bytes=300,
        simulated=True,
        published=published,
    )
    second = _report("1.2", [_reading("a", True), _reading("b", None)], fetched_bytes=100)
    tally = Tally(_summary(studies=4, errors=1), LogNames())
    error = ErrorRecord(source="s3://in/x", reason="bad", kind="NotDicom", stage="report")
    tally.add(StudyOutcome("1.1", first, [error], "1.1"))
    tally.add(StudyOutcome("1.2", second, [], "1.2"))
    tally.add(StudyOutcome("1.3", None, log_id="1.3", elsewhere="claimed by run x"))
    s = tally.finish()

    assert tally.done == 3 and (s.reported, s.degraded, s.needs_review) == (2, 1, 1)
    assert (s.errors, s.claimed_elsewhere) == (2, 1)
    assert [e.study_instance_uid for e in s.review_queue] == ["1.1"]
    # 3 paid readings + the synthesis call; the cached reading is a hit, not a call
    assert (s.model_calls, s.cache_hits, s.requests) == (4, 1, 6)
    assert (s.input_tokens, s.estimated_input_tokens, s.output_tokens) == (3050, 2700, 320)
    assert s.cost_usd == 0.034 and s.cached_cost_usd == 0.02
    assert s.simulated and s.fetched_bytes == 400
    assert s.fetched_bytes_by_study == {"1.1": 300, "1.2": 100}
    assert (s.published, s.publish_failed) == (0, ["1.1"])
    assert [r["study"] for r in tally.rows] == ["1.1", "1.2"]
    # the kappa's subjects are the studies every model read: 1.2's second reading failed
    assert (s.fleiss_kappa, s.kappa_studies) == (None, 1)


def test_tally_merges_shards_but_not_their_studies_skips_or_kappa():
    tally = Tally(_summary(studies=10, skipped=2), LogNames())
    for i in range(2):
        counts = {"studies": 4, "reported": 4, "degraded": 1, "model_calls": 8}
        usage = {"input_tokens": 100, "cost_usd": 0.1, "simulated": True}
        kappa = {"fleiss_kappa": 0.5, "kappa_studies": 4}
        tally.merge(
            _summary(f"c{i}", **counts, **usage, **kappa, fetched_bytes_by_study={f"1.{i}": 5})
        )
    tally.add_unread(3)  # a study of a failed shard: 3 error records
    tally.add_unread(0)  # one its shard had reported before failing
    parent = tally.finish()
    assert (parent.studies, parent.skipped, parent.reported, parent.degraded) == (10, 2, 9, 2)
    assert (parent.model_calls, parent.input_tokens, parent.cost_usd) == (16, 200, 0.2)
    assert parent.errors == 3 and parent.fetched_bytes_by_study == {"1.0": 5, "1.1": 5}
    assert parent.simulated and parent.fleiss_kappa is None and parent.run_id == "r"
    assert parent.shards == ["c0", "c1"]


def _write_report(dest: LocalStore, study: Study, **fields) -> None:
    data = {"inputs_fingerprint": study.fingerprint, "created_at": NOW.isoformat(), **fields}
    dest.write_bytes(report_key(study.study_instance_uid), json.dumps(data).encode())


def test_reported_studies_are_skipped_unless_forced_or_their_sr_is_not_published(tmp_path):
    dest = LocalStore(tmp_path)
    done, changed, new, unpublished = (_study(f"1.{i}") for i in range(4))
    _write_report(dest, done)
    _write_report(dest, changed, inputs_fingerprint="older inputs")
    target = PublishTarget("dicomweb+http://pacs/dicom-web", DicomWebConfig())
    published = {"target": target.uri, "state": "stored"}
    _write_report(dest, unpublished, published=published | {"state": "failed"})
    studies = [done, changed, new, unpublished]

    assert already_reported(dest, done) and not already_reported(dest, new)
    assert not already_reported(dest, changed)  # its inputs changed since
    assert to_read(dest, studies, False, None) == [changed, new]
    assert to_read(dest, studies, True, None) == studies
    # with publishing on: a study whose SR failed to go is read (and sent) again
    assert to_read(dest, studies, False, target) == [done, changed, new, unpublished]
    _write_report(dest, done, published=published)
    assert to_read(dest, studies, False, target) == [changed, new, unpublished]


def test_studies_of_a_failed_task_or_shard_end_as_error_records(tmp_path):
    dest = LocalStore(tmp_path)
    reported_study, lost = _study("2.1", 2), _study("2.2", 3)
    _write_report(dest, reported_study)

    assert fail_unreported(dest, reported_study, "shard 1/2 failed: boom") == 0
    assert fail_unreported(dest, lost, "shard 1/2 failed: boom") == 3
    outcome = fail_unread(dest, reported_study, "ValueError: bad", LogNames())
    assert (outcome.study_instance_uid, outcome.report, outcome.log_id) == ("2.1", None, "2.1")
    records = [json.loads(p.read_text()) for p in (tmp_path / "errors").glob("*.json")]
    assert sorted(r["source"] for r in records) == sorted(
        ref.uri for s in (reported_study, lost) for ref in s.objects
    )
    assert {r["reason"] for r in records} == {
        "study 2.2 failed: shard 1/2 failed: boom",
        "study 2.1 failed: ValueError: bad",
    }
    assert [r.source for r in outcome.errors] == [ref.uri for ref in reported_study.objects]
