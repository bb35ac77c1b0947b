"""The review queue as it stands (``radflow reviews list``) and the verdicts as data: evaluation
labels (``radflow reviews export``, and the ``reviews:DEST`` label source of ``radflow
evaluate``) and fine-tune annotations for ``radflow build-dataset``."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.config import StorageConfig
from tasks.core.errors import LabelError, RadflowError
from tasks.core.schema import Report
from tasks.core.words import result, short_result
from tasks.reports.write import report_key, review_key
from tasks.review.verdicts import Verdict, load_report, read_verdict
from tasks.storage import Store, open_store, read_json

__all__ = [
    "REVIEWS_SCHEME",
    "STATUSES",
    "Export",
    "ReviewRow",
    "annotations_jsonl",
    "export",
    "flagged_uids",
    "labels_csv",
    "review_labels",
    "review_rows",
    "row_cells",
]

logger = logging.getLogger(__name__)

REVIEWS_SCHEME = "reviews:"
STATUSES = ("pending", "requested", "expired", "not_requested", "done", "cleared")


@dataclass
class ReviewRow:
    """One flagged study of DEST: its report, its verdict and where its review stands."""

    uid: str
    status: str
    report: Report | None
    verdict: Verdict | None
    patient_id: str | None = None
    problem: str | None = None  # why the study's files could not be read


@dataclass
class Export:
    labels: str  # CSV text
    annotations: str  # JSONL text
    labelled: int
    abnormal: int
    not_assessable: int
    skipped: list[str]  # "<uid>: reason" of verdicts left out of the annotations


def flagged_uids(dest: str, storage: StorageConfig | None = None) -> list[str]:
    """The studies with a review pointer (DEST/review/<uid>.json), sorted."""
    root = f"{dest.rstrip('/')}/{review_key('x').rpartition('/')[0]}"
    if not root.startswith("s3://") and not Path(root).is_dir():
        return []
    refs = open_store(root, storage).list()
    return sorted(  # review/<uid>.json; not review/ids/ (the review runs' index)
        r.key.removesuffix(".json") for r in refs if r.key.endswith(".json") and "/" not in r.key
    )


def _patient_id(store: Store, uid: str) -> str | None:
    """The source PatientID as report.fhir.json's subject holds it (DEST only)."""
    fhir = read_json(store, report_key(uid, "report.fhir.json")) or {}
    value = ((fhir.get("subject") or {}).get("identifier") or {}).get("value")
    return str(value) if value else None


def _status(pointer: dict, report: Report, verdict: Verdict | None, now: datetime) -> str:
    if verdict is not None:
        return "done"
    if not pointer.get("needs_review", True):
        return "cleared"  # a later screening no longer flags it
    state = report.review
    if state is None:
        return "not_requested"
    if state.status in ("requested", "pending") and state.expires_at and state.expires_at < now:
        return "expired"
    return state.status


def _row(store: Store, uid: str, now: datetime) -> ReviewRow:
    try:
        pointer = read_json(store, review_key(uid)) or {}
        report = load_report(store, uid)
        verdict = read_verdict(store, uid)
    except (RadflowError, ValueError) as exc:  # one unreadable study, not the listing
        return ReviewRow(uid, "unreadable", None, None, problem=str(exc))
    row = ReviewRow(uid, _status(pointer, report, verdict, now), report, verdict)
    if verdict is not None:
        row.patient_id = _patient_id(store, uid)
    return row


def review_rows(
    dest: str, storage: StorageConfig | None = None, now: datetime | None = None
) -> list[ReviewRow]:
    """Every flagged study of ``dest`` with its status (see ``STATUSES``); the expiry of an
    unanswered review is read from its ``expires_at``, so no Prefect API is needed."""
    storage = storage or StorageConfig()
    store = open_store(dest, storage)
    now = now or datetime.now(UTC)
    uids = flagged_uids(dest, storage)
    with ThreadPoolExecutor(max_workers=storage.max_concurrency) as pool:
        return list(pool.map(lambda uid: _row(store, uid, now), uids))


def _labelled(rows: Sequence[ReviewRow]) -> list[ReviewRow]:
    return [r for r in rows if r.verdict is not None and not r.verdict.not_assessable]


def labels_csv(rows: Sequence[ReviewRow]) -> str:
    """The verdicts in the evaluation's LABELS format: study_instance_uid, abnormal (0/1),
    patient_id (where known), findings (';'-separated)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["study_instance_uid", "abnormal", "patient_id", "findings"])
    for r in _labelled(rows):
        v = r.verdict
        writer.writerow([r.uid, int(bool(v.abnormal)), r.patient_id or "", "; ".join(v.findings)])
    return out.getvalue()


def _relative(source: str, images: str) -> str | None:
    """``source`` (an image's input URI from report.json) as a key under ``images``."""
    if images.startswith("s3://"):
        prefix = images.rstrip("/") + "/"
        return source[len(prefix) :] if source.startswith(prefix) else None
    if source.startswith("s3://"):
        return None
    rel = os.path.relpath(os.path.abspath(source), os.path.abspath(images))
    return None if rel.startswith("..") else Path(rel).as_posix()


def annotations_jsonl(rows: Sequence[ReviewRow], images: str) -> tuple[str, list[str]]:
    """The verdicts as `radflow build-dataset` annotations (the seed's keys plus patient_id,
    abnormal, urgency), their images named relative to ``images`` (the screening SOURCE).
    Returns the JSONL text and the verdicts left out, each with its reason."""
    lines, skipped = [], []
    for r in _labelled(rows):
        v, report = r.verdict, r.report
        keys = [_relative(i.source, images) for i in report.images]
        if not keys or None in keys:
            skipped.append(f"{r.uid}: its key images are not under {images}")
            continue
        if not r.patient_id:
            skipped.append(f"{r.uid}: no patient_id (report.fhir.json names none)")
            continue
        normal = result(False)
        record = {
            "image": keys,
            "patient_id": r.patient_id,
            "abnormal": bool(v.abnormal),
            "urgency": v.urgency.value,
            "diagnosis": (v.findings[0] if v.findings else "abnormal") if v.abnormal else normal,
            "findings": v.findings,
            "image_description": v.findings_text or ("" if v.abnormal else normal),
            "recommendation": "",
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines), skipped


def export(dest: str, images: str | None = None, storage: StorageConfig | None = None) -> Export:
    """Labels (and, given the screening SOURCE as ``images``, annotations) from DEST's
    verdicts; not-assessable verdicts make no label."""
    rows = review_rows(dest, storage)
    labelled = _labelled(rows)
    annotations, skipped = annotations_jsonl(rows, images) if images else ("", [])
    return Export(
        labels=labels_csv(rows),
        annotations=annotations,
        labelled=len(labelled),
        abnormal=sum(bool(r.verdict.abnormal) for r in labelled),
        not_assessable=sum(1 for r in rows if r.verdict and r.verdict.not_assessable),
        skipped=skipped,
    )


def review_labels(uri: str, storage: StorageConfig | None = None) -> str:
    """The LABELS text of ``reviews:DEST``: every usable verdict under DEST."""
    dest = uri.removeprefix(REVIEWS_SCHEME)
    made = export(dest, storage=storage)
    if not made.labelled:
        raise LabelError(
            f'labels "{uri}": no usable review verdict under "{dest}" '
            f"({made.not_assessable} not assessable)",
            hint="review flagged studies first (review.requests); `radflow reviews list DEST`",
        )
    logger.info("labels from %d review verdicts under %s", made.labelled, dest)
    return made.labels


def row_cells(row: ReviewRow) -> dict[str, str]:
    """One line of `radflow reviews list`."""
    report, verdict = row.report, row.verdict
    cells = {"study": row.uid, "status": row.status}
    if report is None:
        return cells | {"ai": "—", "when": "—", "verdict": row.problem or "—", "run": "—"}
    c = report.consensus
    cells["ai"] = f"{short_result(c.abnormal)}, {c.urgency.value if c.urgency else '—'}"
    state = report.review
    if verdict is not None:
        said = (
            "not assessable"
            if verdict.not_assessable
            else f"{short_result(bool(verdict.abnormal))}, {verdict.urgency.value}"
        )
        cells["when"] = f"reviewed {verdict.reviewed_at:%Y-%m-%d %H:%M}"
        cells["verdict"] = f"{said} ({verdict.reviewer})"
        cells["run"] = verdict.flow_run_name or "—"
        return cells
    if state is not None and state.expires_at:
        cells["when"] = f"expires {state.expires_at:%Y-%m-%d %H:%M}"
    elif state is not None and state.requested_at:
        cells["when"] = f"requested {state.requested_at:%Y-%m-%d %H:%M}"
    else:
        cells["when"] = "—"
    cells["verdict"] = (state.reason if state else None) or "—"
    cells["run"] = (state.flow_run_name if state else None) or "—"
    return cells
