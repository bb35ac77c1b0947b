"""The radiologist's verdict: the typed form a review run waits for (a Prefect ``RunInput``),
the ``studies/<uid>/review.json`` record it becomes, and the ``review`` state of report.json."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from enum import StrEnum

from prefect.input import RunInput
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.errors import ReviewError
from tasks.core.privacy import LogNames, load_key
from tasks.core.schema import Report, ReviewState, Urgency
from tasks.reports.write import report_key, review_key, validate_report
from tasks.storage import Store

__all__ = [
    "Answer",
    "ReviewForm",
    "ReviewedReport",
    "Verdict",
    "load_report",
    "read_verdict",
    "index_key",
    "resolve",
    "review_names",
    "review_run_name",
    "set_review_state",
    "split_findings",
    "done_state",
    "verdict_from_form",
    "verdict_key",
    "write_index",
    "write_verdict",
]

logger = logging.getLogger(__name__)

VERDICT_SCHEMA_VERSION = "1"


class Answer(StrEnum):
    YES = "yes"
    NO = "no"


# Checked by the Prefect server (JSON Schema) before it resumes the run, so a contradictory
# form is refused in the UI and never reaches the flow; skipped when "not assessable" is ticked.
_NOT_ASSESSABLE = {
    "properties": {"not_assessable": {"const": True}},
    "required": ["not_assessable"],
}
_CONSISTENCY = [
    {
        "if": {
            "properties": {"abnormal": {"const": "no"}},
            "required": ["abnormal"],
            "not": _NOT_ASSESSABLE,
        },
        "then": {"properties": {"urgency": {"const": "normal"}}},
    },
    {
        "if": {
            "properties": {"abnormal": {"const": "yes"}},
            "required": ["abnormal"],
            "not": _NOT_ASSESSABLE,
        },
        "then": {"properties": {"urgency": {"enum": ["follow_up", "immediate"]}}},
    },
]
_INITIALS = r"^[A-Za-zㄱ-ㆎ가-힣]{2,6}$"


class ReviewForm(RunInput):
    """What the radiologist fills in on the review run's page in the Prefect UI."""

    model_config = ConfigDict(json_schema_extra={"allOf": _CONSISTENCY})

    abnormal: Answer = Field(
        title="Abnormal", description="Is anything abnormal in this study? (yes / no)"
    )
    urgency: Urgency = Field(
        title="Urgency",
        description="immediate (treat now) | follow_up | normal; normal if and only if the "
        "study is not abnormal",
    )
    findings: str = Field(
        "",
        max_length=4000,
        title="Findings",
        description="What you see, free text; separate findings with ';' or new lines",
    )
    reviewer: str = Field(
        title="Reviewer initials", pattern=_INITIALS, description="2-6 letters, e.g. KJH"
    )
    not_assessable: bool = Field(
        False,
        title="Not assessable",
        description="Tick when the images cannot be assessed (quality, wrong region, missing "
        "series): the review is recorded, but no label is made from it",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ReviewForm:
        if not self.not_assessable and (self.abnormal is Answer.YES) == (
            self.urgency is Urgency.NORMAL
        ):
            raise ValueError(
                f"abnormal={self.abnormal.value} contradicts urgency={self.urgency.value}"
            )
        return self


class ReviewedReport(BaseModel):
    """The report version the reviewer saw, and what the AI said in it."""

    key: str
    created_at: datetime = Field(description="the report's version stamp (report.json)")
    inputs_fingerprint: str
    prompt_version: str
    abnormal: bool | None
    urgency: Urgency | None
    score: float | None
    agreement: float
    review_reasons: list[str] = Field(default_factory=list)
    simulated: bool = Field(False, description="the readings came from the simulator")


class Verdict(BaseModel):
    """studies/<uid>/review.json: who reviewed the study, when, and what they decided."""

    schema_version: str = VERDICT_SCHEMA_VERSION
    study_instance_uid: str
    abnormal: bool | None = Field(description="null when not assessable")
    urgency: Urgency | None = Field(description="null when not assessable")
    findings: list[str] = Field(default_factory=list)
    findings_text: str = ""
    not_assessable: bool = False
    reviewer: str = Field(description="the reviewer's initials, as entered")
    reviewed_at: datetime
    report: ReviewedReport
    agrees_with_consensus: bool | None = Field(
        description="the reviewer's abnormal equals the consensus' (null if either is unknown)"
    )
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    attempt: int = 1
    requested_at: datetime | None = None


def verdict_key(uid: str) -> str:
    return report_key(uid, "review.json")


def review_names(store: Store) -> LogNames:
    """How review runs, their tags and artifacts name a study: its log id keyed by DEST's
    privacy key (tasks.core.privacy: the same id as the screening logs with ``privacy.log_uids:
    hash``, mapped back by ``radflow lookup DEST ID``), whatever ``log_uids`` says: a run
    name never carries a UID, and a plain hash of one would not hide it."""
    return LogNames(load_key(store))


def review_run_name(report: Report, study: str, attempt: int = 1) -> str:
    """``review-ct-immediate-3f2a9c01b2c4d5e6``: modality, the AI's urgency and ``study``
    (the review id)."""
    modality = re.sub(r"[^a-z0-9]+", "", report.context.get("modality", "").lower())[:8]
    urgency = report.consensus.urgency.value if report.consensus.urgency else "unread"
    parts = ["review", modality or "study", urgency.replace("_", "-"), study]
    return "-".join(parts) + (f"-{attempt}" if attempt > 1 else "")


def index_key(study: str) -> str:
    """Where a review id's StudyInstanceUID is kept (DEST only), so that a review run's
    parameters carry no identifier."""
    return f"{review_key(study).rpartition('/')[0]}/ids/{study}.json"


def write_index(store: Store, study: str, uid: str) -> None:
    body = json.dumps({"study_instance_uid": uid}).encode()
    store.write_bytes(index_key(study), body, "application/json")


def resolve(store: Store, study: str) -> str:
    """The StudyInstanceUID of a review id; one ReviewError naming it when it is unknown."""
    key = index_key(study)
    if not re.fullmatch(r"[0-9a-f]{16}", study) or not store.exists(key):
        raise ReviewError(f'review id "{study}" is not known under "{store.uri}" ({key})')
    return str(json.loads(store.read_bytes(key))["study_instance_uid"])


def split_findings(text: str) -> list[str]:
    return [f.strip() for f in re.split(r"[;\n]+", text) if f.strip()]


def load_report(store: Store, uid: str) -> Report:
    """The study's report.json; one ReviewError naming it when it is missing or invalid."""
    key = report_key(uid)
    if not store.exists(key):
        raise ReviewError(f'study {uid} has no report under "{store.uri}" ({key})')
    try:
        return Report.model_validate_json(store.read_bytes(key))
    except ValidationError as exc:
        raise ReviewError(f'"{key}" under "{store.uri}" is not a valid report: {exc}') from None


def set_review_state(store: Store, report: Report, state: ReviewState) -> Report:
    """Write report.json again with ``state`` as its ``review`` (schema-validated)."""
    report = report.model_copy(update={"review": state})
    validate_report(json.loads(report.model_dump_json()))
    store.write_bytes(
        report_key(report.study_instance_uid),
        report.model_dump_json(indent=2).encode(),
        "application/json",
    )
    return report


def read_verdict(store: Store, uid: str) -> Verdict | None:
    key = verdict_key(uid)
    if not store.exists(key):
        return None
    try:
        return Verdict.model_validate_json(store.read_bytes(key))
    except ValidationError as exc:
        raise ReviewError(f'"{key}" under "{store.uri}" is not a valid review: {exc}') from None


def write_verdict(store: Store, verdict: Verdict) -> str:
    key = verdict_key(verdict.study_instance_uid)
    store.write_bytes(key, verdict.model_dump_json(indent=2).encode(), "application/json")
    return key


def verdict_from_form(
    form: ReviewForm,
    report: Report,
    *,
    flow_run_id: str | None = None,
    flow_run_name: str | None = None,
    attempt: int = 1,
    requested_at: datetime | None = None,
    reviewed_at: datetime | None = None,
) -> Verdict:
    """The review.json record of a submitted form about ``report``."""
    c = report.consensus
    abnormal = None if form.not_assessable else form.abnormal is Answer.YES
    return Verdict(
        study_instance_uid=report.study_instance_uid,
        abnormal=abnormal,
        urgency=None if form.not_assessable else form.urgency,
        findings=split_findings(form.findings),
        findings_text=form.findings.strip(),
        not_assessable=form.not_assessable,
        reviewer=form.reviewer,
        reviewed_at=reviewed_at or datetime.now(UTC),
        report=ReviewedReport(
            key=report_key(report.study_instance_uid),
            created_at=report.created_at,
            inputs_fingerprint=report.inputs_fingerprint,
            prompt_version=report.prompt_version,
            abnormal=c.abnormal,
            urgency=c.urgency,
            score=c.score,
            agreement=c.agreement,
            review_reasons=c.review_reasons,
            simulated=report.simulated,
        ),
        agrees_with_consensus=None
        if abnormal is None or c.abnormal is None
        else abnormal == c.abnormal,
        flow_run_id=flow_run_id,
        flow_run_name=flow_run_name,
        attempt=attempt,
        requested_at=requested_at,
    )


def done_state(verdict: Verdict, state: ReviewState | None = None) -> ReviewState:
    """The report's review state once ``verdict`` is stored (``state``: the one it replaces)."""
    return (state or ReviewState(status="done")).model_copy(
        update={
            "status": "done",
            "flow_run_id": verdict.flow_run_id,
            "flow_run_name": verdict.flow_run_name,
            "attempt": verdict.attempt,
            "requested_at": verdict.requested_at,
            "reviewed_at": verdict.reviewed_at,
            "reviewer": verdict.reviewer,
            "abnormal": verdict.abnormal,
            "urgency": verdict.urgency,
            "not_assessable": verdict.not_assessable,
            "verdict": verdict_key(verdict.study_instance_uid),
        }
    )
