"""S3 notification parsing, de-duplication and grouping by study folder (pure functions)."""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import NotificationError
from tasks.ingest.events import (
    STUDY_READY,
    ObjectCreated,
    StudyBatcher,
    parse_notification,
    study_event,
    study_prefix,
)


def _body(*records: tuple[str, str, str], event: str = "ObjectCreated:Put") -> str:
    """An S3 notification as S3 (and moto) send it: keys percent-encoded, spaces as '+'."""
    from urllib.parse import quote_plus

    return json.dumps(
        {
            "Records": [
                {
                    "eventName": event,
                    "eventTime": "2026-11-27T22:00:00.000Z",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {"key": quote_plus(key), "size": 10, "eTag": etag},
                    },
                }
                for bucket, key, etag in records
            ]
        }
    )


def test_parse_unquotes_keys_and_skips_test_and_other_events():
    body = _body(("scans", "in/study 1/a+b é.dcm", "e1"))
    assert parse_notification(body) == [
        ObjectCreated("scans", "in/study 1/a+b é.dcm", "e1", 10, "2026-11-27T22:00:00.000Z")
    ]
    assert parse_notification('{"Service": "Amazon S3", "Event": "s3:TestEvent"}') == []
    assert parse_notification(_body(("scans", "x.dcm", "e"), event="ObjectRemoved:Delete")) == []
    # delivered through SNS: the S3 JSON is a string inside "Message"
    sns = json.dumps({"Type": "Notification", "Message": body})
    assert [r.key for r in parse_notification(sns)] == ["in/study 1/a+b é.dcm"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1]", "JSON list"),
        ('{"hello": 1}', 'no "Records"'),
        ('{"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}', "record 0 is malformed"),
    ],
)
def test_parse_rejects_what_is_not_a_notification(body, reason):
    with pytest.raises(NotificationError, match=reason):
        parse_notification(body)


def test_study_prefix_is_the_folder():
    assert study_prefix("in/st1/a.dcm") == "in/st1/"
    assert study_prefix("a.dcm") == ""


def _rec(key: str, etag: str = "e") -> ObjectCreated:
    return ObjectCreated("scans", key, etag, 10)


def test_batcher_waits_for_quiet_and_groups_by_folder():
    b = StudyBatcher(quiet_seconds=2)
    b.add("m1", [_rec("in/st1/a.dcm")], now=0)
    b.add("m2", [_rec("in/st2/x.dcm")], now=0.5)
    b.add("m3", [_rec("in/st1/b.dcm")], now=1.5)  # st1 is not quiet yet
    assert [s.prefix for s in b.ready(now=2.6)] == ["in/st2/"]
    assert [s.prefix for s in b.ready(now=3.5)] == ["in/st1/", "in/st2/"]
    assert b.next_deadline() == 2.5
    st1 = b.pending[("scans", "in/st1/")]
    assert st1.keys == ["in/st1/a.dcm", "in/st1/b.dcm"]
    assert sorted(b.emitted(st1)) == ["m1", "m3"]
    assert b.emitted(b.pending[("scans", "in/st2/")]) == ["m2"]
    assert b.pending == {} and b.next_deadline() is None


def test_batcher_drops_duplicates_including_the_multipart_double_event():
    b = StudyBatcher(quiet_seconds=1)
    b.add("put", [_rec("in/st1/m.dcm", "abc-1")], now=0)
    b.add("complete", [_rec("in/st1/m.dcm", "abc-1")], now=0.1)  # CompleteMultipartUpload
    assert b.duplicates == 1
    (study,) = b.ready(now=5)
    assert study.keys == ["in/st1/m.dcm"] and study.last_seen == 0
    # both messages are released together, only once the study is emitted
    assert b.deletable() == []
    assert sorted(b.emitted(study)) == ["complete", "put"]
    # a redelivery after the event: dropped, and its message may go at once
    b.add("late", [_rec("in/st1/m.dcm", "abc-1")], now=6)
    assert b.pending == {} and b.duplicates == 2 and b.deletable() == ["late"]
    # new content under the same key is a new upload
    b.add("again", [_rec("in/st1/m.dcm", "def-1")], now=7)
    assert list(b.pending) == [("scans", "in/st1/")]


def test_a_message_feeding_two_studies_waits_for_both():
    b = StudyBatcher(quiet_seconds=0)
    b.add("m", [_rec("in/a/1.dcm"), _rec("in/b/1.dcm")], now=0)
    first, second = b.ready(now=0)
    assert b.emitted(first) == []
    assert b.emitted(second) == ["m"]


def test_study_event_names_bucket_prefix_and_keys_with_a_stable_id():
    b = StudyBatcher(quiet_seconds=0)
    b.add("m", [_rec("in/st 1/b.dcm", "2"), _rec("in/st 1/a.dcm", "1")], now=0)
    (study,) = b.ready(now=0)
    event = study_event(study)
    assert event["event"] == STUDY_READY
    assert event["resource"]["prefect.resource.id"] == "s3://scans/in/st 1/"
    assert event["payload"]["bucket"] == "scans"
    assert event["payload"]["prefix"] == "in/st 1/"
    assert event["payload"]["keys"] == ["in/st 1/a.dcm", "in/st 1/b.dcm"]
    assert event["payload"]["names"] == ["a.dcm", "b.dcm"]
    assert study_event(study)["id"] == event["id"]  # re-emitted after a crash: same id
    study.objects["in/st 1/a.dcm"] = _rec("in/st 1/a.dcm", "changed")
    assert study_event(study)["id"] != event["id"]


def test_negative_quiet_seconds_is_refused():
    with pytest.raises(ValueError, match="quiet_seconds"):
        StudyBatcher(quiet_seconds=-1)
