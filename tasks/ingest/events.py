"""S3 upload notifications → one ``radflow.study.ready`` event per study: parsing, de-duplication
and grouping by study folder, waiting until the folder is quiet (pure logic; the SQS loop is
``flows/bridge.py``)."""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from tasks.core.errors import NotificationError

__all__ = [
    "STUDY_READY",
    "ObjectCreated",
    "PendingStudy",
    "SelectedObjects",
    "StudyBatcher",
    "parse_notification",
    "study_event",
    "study_prefix",
]

logger = logging.getLogger(__name__)

STUDY_READY = "radflow.study.ready"
# uuid5 namespace of study events: the same objects always give the same event id, so a bridge
# that crashes between emitting and deleting re-emits an event the server has already seen.
_EVENT_NAMESPACE = uuid.UUID("5d0c6f38-5a0e-4f5e-9d7a-3c1f4a1e2b90")


@dataclass(frozen=True)
class ObjectCreated:
    """One S3 ``ObjectCreated:*`` record; ``key`` is decoded (S3 sends it percent-encoded with
    '+' for spaces, see the S3 event message structure)."""

    bucket: str
    key: str
    etag: str
    size: int
    event_time: str = ""

    @property
    def identity(self) -> tuple[str, str, str]:
        """Same object, same content: a multipart upload's second event has the same identity."""
        return (self.bucket, self.key, self.etag)


def parse_notification(body: str | bytes) -> list[ObjectCreated]:
    """The ObjectCreated records of one SQS message body; ``s3:TestEvent`` and other event types
    give no records. Raises ``NotificationError`` when the body is not an S3 notification."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotificationError(f"SQS message body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise NotificationError(f"SQS message body is a JSON {type(doc).__name__}, not an object")
    if doc.get("Event") == "s3:TestEvent":
        return []
    if "Message" in doc and "Records" not in doc:  # delivered through SNS: the S3 JSON is inside
        return parse_notification(doc["Message"])
    records = doc.get("Records")
    if not isinstance(records, list):
        raise NotificationError(f'SQS message has no "Records" list (keys: {sorted(doc)[:8]})')
    out = []
    for i, rec in enumerate(records):
        name = str(rec.get("eventName", ""))
        if not name.startswith("ObjectCreated:"):
            continue
        try:
            s3 = rec["s3"]
            obj = s3["object"]
            out.append(
                ObjectCreated(
                    bucket=s3["bucket"]["name"],
                    key=unquote_plus(obj["key"]),
                    etag=str(obj.get("eTag") or obj.get("sequencer") or ""),
                    size=int(obj.get("size") or 0),
                    event_time=str(rec.get("eventTime", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NotificationError(f"S3 record {i} is malformed: missing or bad {exc}") from None
    return out


def study_prefix(key: str) -> str:
    """The folder of a key, with a trailing '/' (or "" at the bucket root): one study each."""
    folder = posixpath.dirname(key)
    return f"{folder}/" if folder else ""


@dataclass
class PendingStudy:
    """A study folder that received objects and is waiting to be quiet."""

    bucket: str
    prefix: str
    objects: dict[str, ObjectCreated] = field(default_factory=dict)
    messages: set[str] = field(default_factory=set)
    first_seen: float = 0.0
    last_seen: float = 0.0

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def keys(self) -> list[str]:
        return sorted(self.objects)


class StudyBatcher:
    """Collects records per (bucket, study folder) until no new object arrived for
    ``quiet_seconds``, and tells which SQS messages may be deleted once studies are emitted.

    Duplicates are dropped: the same object and content seen twice (S3 delivers at least once;
    a multipart upload gives ``Put`` and ``CompleteMultipartUpload``), while pending or after
    being emitted (remembered for the last ``remember`` objects).
    """

    def __init__(self, quiet_seconds: float, remember: int = 100_000) -> None:
        if quiet_seconds < 0:
            raise ValueError(f"quiet_seconds must be >= 0, got {quiet_seconds}")
        self.quiet_seconds = quiet_seconds
        self.remember = remember
        self.pending: dict[tuple[str, str], PendingStudy] = {}
        self._emitted: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._waiting: dict[str, set[tuple[str, str]]] = {}  # message id → studies it feeds
        self.duplicates = 0

    def add(self, message_id: str, records: Iterable[ObjectCreated], now: float) -> None:
        """Record one SQS message's records, received at monotonic time ``now``."""
        studies = self._waiting.setdefault(message_id, set())
        for rec in records:
            if rec.identity in self._emitted:
                self.duplicates += 1
                continue
            group = (rec.bucket, study_prefix(rec.key))
            study = self.pending.get(group)
            if study is None:
                study = self.pending[group] = PendingStudy(*group, first_seen=now)
            previous = study.objects.get(rec.key)
            if previous is not None and previous.etag == rec.etag:
                self.duplicates += 1
            else:
                study.objects[rec.key] = rec
                study.last_seen = now
            study.messages.add(message_id)
            studies.add(group)

    def ready(self, now: float) -> list[PendingStudy]:
        """Studies quiet for ``quiet_seconds``, oldest first."""
        quiet = [s for s in self.pending.values() if now - s.last_seen >= self.quiet_seconds]
        return sorted(quiet, key=lambda s: s.first_seen)

    def next_deadline(self) -> float | None:
        """Monotonic time at which the next pending study becomes quiet."""
        if not self.pending:
            return None
        return min(s.last_seen for s in self.pending.values()) + self.quiet_seconds

    def emitted(self, study: PendingStudy) -> list[str]:
        """Mark ``study`` as emitted; return the message ids that feed no pending study now."""
        self.pending.pop((study.bucket, study.prefix), None)
        for rec in study.objects.values():
            self._emitted[rec.identity] = None
        while len(self._emitted) > self.remember:
            self._emitted.popitem(last=False)
        return list(self._release((study.bucket, study.prefix)))

    def deletable(self) -> list[str]:
        """Messages that feed no study at all (test events, duplicates): delete them at once."""
        done = [m for m, studies in self._waiting.items() if not studies]
        for message_id in done:
            del self._waiting[message_id]
        return done

    def _release(self, group: tuple[str, str]) -> Iterator[str]:
        for message_id, studies in list(self._waiting.items()):
            studies.discard(group)
            if not studies:
                del self._waiting[message_id]
                yield message_id


def study_event(study: PendingStudy) -> dict[str, Any]:
    """The ``radflow.study.ready`` event (Prefect's Event fields) announcing one quiet study.

    ``payload.names`` are the keys relative to ``prefix``: the on-upload deployment passes them
    to the screening flow's ``keys`` parameter with ``source = s3://bucket/prefix``.
    """
    objects = [study.objects[k] for k in study.keys]
    identity = "\n".join(f"{o.bucket}/{o.key}@{o.etag}" for o in objects)
    payload: Mapping[str, Any] = {
        "bucket": study.bucket,
        "prefix": study.prefix,
        "keys": [o.key for o in objects],
        "names": [o.key[len(study.prefix) :] for o in objects],
        "bytes": sum(o.size for o in objects),
        "first_upload": min((o.event_time for o in objects), default=""),
        "last_upload": max((o.event_time for o in objects), default=""),
    }
    return {
        "id": str(uuid.uuid5(_EVENT_NAMESPACE, identity)),
        "event": STUDY_READY,
        "resource": {
            "prefect.resource.id": study.uri,
            "prefect.resource.name": study.prefix or study.bucket,
            "radflow.bucket": study.bucket,
        },
        "payload": dict(payload),
    }


class SelectedObjects:
    """A store seen through the keys an upload event named: ``list()`` yields only those, so
    objects that arrive later under the same prefix wait for their own event."""

    def __init__(self, store: Any, keys: Iterable[str]) -> None:
        self._store = store
        self.keys = frozenset(keys)
        self.seen: set[str] = set()

    def list(self) -> Iterator[Any]:
        for ref in self._store.list():
            if ref.key in self.keys:
                self.seen.add(ref.key)
                yield ref

    @property
    def missing(self) -> list[str]:
        """Named keys that were not listed (deleted since the event, or a wrong prefix)."""
        return sorted(self.keys - self.seen)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
