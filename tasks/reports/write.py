"""Write what a study's reading produced under DEST: key images, report.md, report.sr.dcm,
report.fhir.json, the review pointer, and report.json last, then remove the key images a
rewritten report no longer references; error records; run summaries."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema
import pydicom

from tasks.core.errors import RadflowError, ReportError, StorageError
from tasks.core.schema import ErrorRecord, Published, Report, ReviewEntry, RunSummary
from tasks.core.words import short_result
from tasks.pacs.publish import PublishTarget, publish_sr, unpublished
from tasks.reports.fhir import build_fhir, fhir_json
from tasks.reports.markdown import image_name, render_markdown
from tasks.reports.sr import build_sr, device_uid, read_evidence, sr_bytes
from tasks.storage import Store, read_json

__all__ = [
    "SCHEMA_ID",
    "error_key",
    "publish_report",
    "remove_stale_images",
    "reported",
    "study_errors",
    "render_markdown",
    "render_review_table",
    "report_key",
    "report_schema",
    "review_entry",
    "review_key",
    "validate_report",
    "write_error",
    "write_errors",
    "write_report",
    "write_run_summary",
    "write_schema_file",
]

if TYPE_CHECKING:
    from tasks.ingest.discover import Study

logger = logging.getLogger(__name__)

SCHEMA_ID = "https://radflow.invalid/schemas/report.schema.json"


def report_key(uid: str, name: str = "report.json") -> str:
    return f"studies/{uid}/{name}"


def reported(
    store: Store, uid: str, fingerprint: str, since: datetime | None = None
) -> dict | None:
    """Study ``uid``'s report.json if it was made from the inputs ``fingerprint`` (and, with
    ``since``, written from then on), else None. An unreadable report.json counts as none:
    the study is read again and its report rewritten."""
    try:
        previous = read_json(store, report_key(uid))
        if not isinstance(previous, dict) or previous.get("inputs_fingerprint") != fingerprint:
            return None
        if since is not None and datetime.fromisoformat(previous["created_at"]) < since:
            return None
    except (ValueError, TypeError, KeyError) as exc:  # JSON, a date or a field that is off
        logger.warning("a report.json is unreadable, its study is read again: %s", exc)
        return None
    return previous


def review_key(uid: str) -> str:
    return f"review/{uid}.json"


def error_key(record: ErrorRecord) -> str:
    """One record per input: the id is a hash of the source, so a rerun overwrites, never adds."""
    return f"errors/{hashlib.sha256(record.source.encode()).hexdigest()[:20]}.json"


@cache
def report_schema() -> dict:
    """The JSON Schema (2020-12) of report.json, generated from the pydantic Report model;
    published as schemas/report.schema.json (tests keep the file up to date)."""
    schema = Report.model_json_schema(mode="serialization")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }


def write_schema_file(path: str | Path = "schemas/report.schema.json") -> Path:
    """(Re)write the published schema file (``make schema``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report_schema(), indent=2, ensure_ascii=False) + "\n", "utf-8")
    return path


def validate_report(data: dict) -> None:
    """Check a report.json document against the published schema; one clear error if not."""
    validator = jsonschema.Draft202012Validator(report_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        uid = data.get("study_instance_uid", "?") if isinstance(data, dict) else "?"
        raise ReportError(f"report.json of study {uid} is invalid at {where}: {error.message}")


def review_entry(report: Report) -> ReviewEntry:
    c = report.consensus
    return ReviewEntry(
        study_instance_uid=report.study_instance_uid,
        abnormal=c.abnormal,
        urgency=c.urgency,
        agreement=c.agreement,
        reasons=c.review_reasons,
        report=report_key(report.study_instance_uid),
    )


def _write_sr_and_fhir(
    store: Store,
    report: Report,
    evidence: Sequence[pydicom.Dataset],
    publish: PublishTarget | None = None,
) -> list[str]:
    uid = report.study_instance_uid
    if publish is None:
        sr = build_sr(report, evidence)
    else:  # STOW-RS to the PACS; the outcome is report.published (a failure included)
        sr, report.published = publish_sr(publish, report, partial(build_sr, report, evidence))
    store.write_bytes(report_key(uid, "report.sr.dcm"), sr_bytes(sr), "application/dicom")
    devices = {r.model: device_uid(r.model, r.model_id) for r in report.readings}
    patient_id = str(evidence[0].get("PatientID", "") or "") or None
    resource = build_fhir(report, devices, patient_id, str(sr.SOPInstanceUID))
    store.write_bytes(
        report_key(uid, "report.fhir.json"), fhir_json(resource), "application/fhir+json"
    )
    return ["report.sr.dcm", "report.fhir.json"]


def write_report(
    store: Store,
    report: Report,
    pngs: dict[str, bytes],
    evidence: Sequence[pydicom.Dataset] = (),
    publish: PublishTarget | None = None,
) -> None:
    """Key images, report.md, report.sr.dcm and report.fhir.json (from ``evidence``: the
    source headers of the key images, read with ``stop_before_pixels``; written to DEST only,
    never sent to a model), the review pointer, then report.json last: it marks a finished
    study. report.json is validated against the published schema before it is written.
    With ``publish``, the SR also goes to that DICOMweb server (``report.published``)."""
    uid = report.study_instance_uid
    outputs = []
    for sha, png in pngs.items():
        store.write_bytes(report_key(uid, image_name(sha)), png, "image/png")
        outputs.append(image_name(sha))
    if evidence:
        outputs += _write_sr_and_fhir(store, report, evidence, publish)
    else:
        logger.warning("study %s: no evidence headers, no SR or FHIR report", report.log_id)
        if publish is not None:
            report.published = unpublished(publish, report, "no SR: no evidence header")
    report.outputs = ["report.md", *outputs]
    store.write_bytes(
        report_key(uid, "report.md"),
        render_markdown(report).encode(),
        "text/markdown; charset=utf-8",
    )
    if report.consensus.needs_review or store.exists(review_key(uid)):
        pointer = {
            "needs_review": report.consensus.needs_review,
            **review_entry(report).model_dump(mode="json"),
            "created_at": report.created_at.isoformat(),
        }
        store.write_bytes(
            review_key(uid), json.dumps(pointer, indent=2).encode(), "application/json"
        )
    data = json.loads(report.model_dump_json())
    validate_report(data)
    store.write_bytes(
        report_key(uid), report.model_dump_json(indent=2).encode(), "application/json"
    )


def remove_stale_images(store: Store, report: Report) -> list[str]:
    """Delete the key images under the study's ``images/`` that ``report`` (just written) does
    not list in its outputs: what an earlier report of the study showed. Returns their keys."""
    uid = report.study_instance_uid
    keep = {report_key(uid, name) for name in report.outputs}
    stale = [k for k in store.list_keys(report_key(uid, "images/")) if k not in keep]
    for key in stale:
        store.delete(key)
    if stale:
        logger.info("study %s: removed %d stale key images", report.log_id, len(stale))
    return stale


def publish_report(
    source: Store,
    dest: Store,
    report: Report,
    pngs: dict[str, bytes],
    evidence: Sequence[tuple[str, str]],
    publish: PublishTarget | None = None,
) -> tuple[list[ErrorRecord], Published | None]:
    """Read the SR evidence (the key images' headers, given as (key, uri) in ``source``) and
    write the study's report files, then remove the stale key images of an earlier report.
    The CPU-heavy end of a study (the SR alone is ~25 ms), so a run may do it in its process
    pool: everything here pickles. An unreadable evidence header costs the SR and FHIR files,
    not the report; stale images that cannot be deleted leave the report in place. Both are
    returned as error records. With ``publish`` the SR is also stored on that DICOMweb
    server. Returns the error records and ``report.published``."""
    errors = []

    def record(source_uri: str, reason: str, exc: RadflowError) -> None:
        errors.append(
            ErrorRecord(
                source=source_uri,
                reason=f"{reason}: {exc}",
                kind=exc.kind,
                stage="report",
                study_instance_uid=report.study_instance_uid,
            )
        )
        write_error(dest, errors[-1])

    try:
        # the SR and FHIR take the patient from the first: one that names the patient
        datasets = sorted(read_evidence(source, evidence), key=lambda ds: not ds.PatientID)
    except RadflowError as exc:
        datasets = []
        record(evidence[0][1], "no SR/FHIR report", exc)
    write_report(dest, report, pngs, datasets, publish)
    try:
        remove_stale_images(dest, report)
    except StorageError as exc:
        folder = report_key(report.study_instance_uid, "images/")
        record(f"{dest.uri.rstrip('/')}/{folder}", "stale key images not removed", exc)
    return errors, report.published  # the caller's copy of ``report`` may be another process's


def study_errors(
    study: Study, reason: str, kind: str = "StudyFailed", stage: str = "screen"
) -> list[ErrorRecord]:
    """One error record per input object of a study that failed as a whole."""
    return [
        ErrorRecord(
            source=ref.uri,
            reason=f"study {study.study_instance_uid} failed: {reason}",
            kind=kind,
            stage=stage,
            study_instance_uid=study.study_instance_uid,
        )
        for ref in study.objects
    ]


def write_error(store: Store, record: ErrorRecord) -> None:
    store.write_bytes(
        error_key(record), record.model_dump_json(indent=2).encode(), "application/json"
    )


def write_errors(store: Store, records: Sequence[ErrorRecord], workers: int = 16) -> None:
    """Write error records ``workers`` at a time: on S3 each is one PUT, and a prefix of
    thousands of non-DICOM objects should not cost thousands of sequential round trips."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="error-records") as pool:
        list(pool.map(lambda record: write_error(store, record), records))


def render_review_table(summary: RunSummary) -> str:
    """runs/<run id>.review.md: the run's review queue, most urgent first."""
    rank = {"immediate": 0, "follow_up": 1, "normal": 2, None: 3}
    rows = sorted(
        summary.review_queue,
        key=lambda e: (rank[e.urgency.value if e.urgency else None], e.study_instance_uid),
    )
    lines = [
        f"# Review queue of run {summary.run_id}",
        "",
        f"{len(rows)} of {summary.reported} studies read need review.",
        "",
        "| study | result | urgency | agreement | reasons | report |",
        "|---|---|---|---|---|---|",
    ]
    for e in rows:
        lines.append(
            f"| {e.study_instance_uid} | {short_result(e.abnormal)} | {e.urgency.value if e.urgency else '—'} "
            f"| {e.agreement:.0%} | {'; '.join(e.reasons).replace('|', '/')} | {e.report} |"
        )
    return "\n".join(lines) + "\n"


def write_run_summary(store: Store, summary: RunSummary) -> str:
    """runs/<run id>.json, and runs/<run id>.review.md when any study needs review."""
    key = f"runs/{summary.run_id}.json"
    if summary.review_queue:
        store.write_bytes(
            f"runs/{summary.run_id}.review.md",
            render_review_table(summary).encode(),
            "text/markdown; charset=utf-8",
        )
    store.write_bytes(key, summary.model_dump_json(indent=2).encode(), "application/json")
    return key
