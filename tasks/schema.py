"""The records radflow produces: the model's structured reading, the consensus, report.json,
error records and run summaries (the binding contract of DESIGN.md, extended)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCHEMA_VERSION",
    "Consensus",
    "ErrorRecord",
    "ImageInfo",
    "MergedItem",
    "ModelReading",
    "Reading",
    "Report",
    "RunSummary",
    "Urgency",
]

SCHEMA_VERSION = "1"


class Urgency(StrEnum):
    """The seed's three levels, ordered from least to most urgent."""

    NORMAL = "normal"
    FOLLOW_UP = "follow_up"
    IMMEDIATE = "immediate"

    @property
    def rank(self) -> int:
        return list(Urgency).index(self)


class Reading(BaseModel):
    """What a model answers: the structured output schema sent to every provider."""

    model_config = ConfigDict(extra="forbid")

    abnormal: bool = Field(description="true if any abnormality is visible")
    findings: list[str] = Field(description="visible findings, one short phrase each")
    differentials: list[str] = Field(
        description="up to three differential diagnoses, likeliest first"
    )
    urgency: Literal["immediate", "follow_up", "normal"] = Field(
        description="immediate (treat now) | follow_up | normal"
    )
    recommended_exams: list[str] = Field(description="further examinations, if any")
    rationale: str = Field(description="one or two sentences explaining the reading")


class ModelReading(BaseModel):
    """One model's reading of one study, as it appears in report.json."""

    model: str
    provider: str
    model_id: str
    ok: bool
    abnormal: bool | None = None
    urgency: Urgency | None = None
    findings: list[str] = Field(default_factory=list)
    differentials: list[str] = Field(default_factory=list)
    recommended_exams: list[str] = Field(default_factory=list)
    rationale: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    error: str | None = None
    refusal: bool = False
    endpoint_host: str | None = None
    response_model: str | None = None
    simulated: bool = Field(False, description="answered by radflow's simulator (a test double)")


class MergedItem(BaseModel):
    text: str
    models: list[str]


class Consensus(BaseModel):
    abnormal: bool | None = Field(description="null when no model produced a reading")
    urgency: Urgency | None
    score: float | None = Field(description="weighted share of abnormal votes, in [0, 1]")
    agreement: float = Field(ge=0, le=1, description="share of readings agreeing with the vote")
    needs_review: bool
    review_reasons: list[str] = Field(default_factory=list)
    findings: list[MergedItem] = Field(default_factory=list)
    differentials: list[MergedItem] = Field(default_factory=list)
    recommended_exams: list[MergedItem] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict, description="vote weight per model")
    rule: str = "weighted-majority-v1"


class ImageInfo(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    source: str
    sha256: str
    width: int
    height: int
    window: str
    frame: int | None = None
    modality: str | None = None


class Report(BaseModel):
    schema_version: str = SCHEMA_VERSION
    study_instance_uid: str
    status: str = Field(description="complete | degraded")
    language: str
    consensus: Consensus
    readings: list[ModelReading]
    images: list[ImageInfo]
    sources: list[str] = Field(default_factory=list, description="input objects of the study")
    context: dict[str, str] = Field(
        default_factory=dict, description="de-identified clinical context sent to the models"
    )
    inputs_fingerprint: str = Field(description="hash of the input objects; reruns skip on match")
    prompt_version: str
    cost_usd: float = 0.0
    simulated: bool = False
    radflow_version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ErrorRecord(BaseModel):
    source: str
    reason: str
    kind: str
    stage: str
    study_instance_uid: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class RunSummary(BaseModel):
    run_id: str
    source: str
    dest: str
    studies: int = 0
    reported: int = 0
    skipped: int = 0
    degraded: int = 0
    needs_review: int = 0
    errors: int = 0
    model_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    simulated: bool = False
    started_at: datetime
    finished_at: datetime | None = None
