"""The records radflow produces: the model's structured reading, the consensus, report.json,
error records and run summaries (the binding contract of docs/design.md, extended)."""

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
    "Impression",
    "MergedItem",
    "ModelReading",
    "ModelStats",
    "Provenance",
    "Published",
    "Reading",
    "Report",
    "ReviewCode",
    "ReviewEntry",
    "ReviewReason",
    "ReviewState",
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
    estimated_input_tokens: int = Field(
        0, description="input tokens estimated before the call (published image formulas)"
    )
    estimated_image_tokens: int = Field(
        0, description="of estimated_input_tokens, the images' (the provider's published rule)"
    )
    output_tokens: int = 0
    cost_usd: float | None = Field(
        0.0, description="null when the provider's answer carried no usage (cost_known false)"
    )
    cost_known: bool = Field(True, description="false: the answer had no usage, cost unknown")
    latency_ms: float = 0.0
    error: str | None = None
    refusal: bool = Field(False, description="the model declined to read (not retried)")
    cut: bool = Field(False, description="the answer was cut at max_output_tokens")
    endpoint_host: str | None = None
    response_model: str | None = None
    simulated: bool = Field(False, description="answered by radflow's simulator (a test double)")
    requests: int = Field(0, description="HTTP requests made (SDK retries, re-ask, fallback)")
    cached: bool = Field(False, description="served from the reading cache: no call, no cost")
    cache_key: str | None = Field(None, description="content address in DEST/cache/readings/")
    reasked: bool = Field(False, description="a schema-invalid answer was asked again once")
    fallback: str | None = Field(None, description="fallback model that answered instead")
    primary_error: str | None = Field(None, description="why the primary model failed")


class MergedItem(BaseModel):
    text: str
    models: list[str]


class ReviewCode(StrEnum):
    """Why a study needs review (rendered in the report's language by tasks.reports.markdown)."""

    MODEL_FAILED = "model_failed"
    NO_READING = "no_reading"
    DISAGREE = "disagree"
    IMMEDIATE = "immediate"
    LOW_AGREEMENT = "low_agreement"


class ReviewReason(BaseModel):
    code: ReviewCode
    models: list[str] = Field(default_factory=list, description="models the reason is about")
    value: float | None = Field(None, description="measured value (e.g. agreement)")
    threshold: float | None = Field(None, description="configured threshold it was held to")


class Consensus(BaseModel):
    abnormal: bool | None = Field(description="null when no model produced a reading")
    urgency: Urgency | None
    score: float | None = Field(description="weighted share of abnormal votes, in [0, 1]")
    agreement: float = Field(ge=0, le=1, description="share of readings agreeing with the vote")
    needs_review: bool
    review_reasons: list[str] = Field(default_factory=list, description="in English")
    review_details: list[ReviewReason] = Field(
        default_factory=list, description="the same reasons, structured"
    )
    findings: list[MergedItem] = Field(default_factory=list)
    differentials: list[MergedItem] = Field(default_factory=list)
    recommended_exams: list[MergedItem] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict, description="vote weight per model")
    weights_source: str = Field("config", description="config | a reliability file")
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
    burned_in: Literal["yes", "no", "unknown"] | None = Field(
        None,
        description="what the source's BurnedInAnnotation says (any YES → yes, all NO → no, "
        "else unknown); pixel text without the flag is not detected",
    )


class Impression(BaseModel):
    """The narrative impression a configured model wrote from the structured readings only
    (no image); it never changes the structured consensus."""

    model_written: Literal[True] = True
    ok: bool
    text: str = ""
    language: str
    model: str
    provider: str
    model_id: str
    endpoint_host: str | None = None
    response_model: str | None = None
    prompt_version: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = Field(0.0, description="null when the answer carried no usage")
    cost_known: bool = Field(True, description="false: the answer had no usage, cost unknown")
    latency_ms: float = 0.0
    simulated: bool = False
    requests: int = Field(0, description="HTTP requests made (SDK retries included)")
    error: str | None = None


class ModelProvenance(BaseModel):
    name: str
    provider: str
    model_id: str
    endpoint_host: str | None = None
    response_model: str | None = None


class Provenance(BaseModel):
    """How report.json was produced: enough to reproduce or audit it."""

    radflow_version: str
    prompt_version: str
    consensus_rule: str
    weights: dict[str, float] = Field(default_factory=dict)
    weights_source: str = "config"
    review_rules: dict[str, float | bool] = Field(default_factory=dict)
    models: list[ModelProvenance] = Field(default_factory=list)
    image_sha256: list[str] = Field(default_factory=list)
    synthesis_prompt_version: str | None = None


class Published(BaseModel):
    """Where the study's report.sr.dcm went (``publish: {dicomweb: ...}``, STOW-RS)."""

    state: Literal["stored", "already_stored", "failed"] = Field(
        description="stored now | already_stored (this version was there) | failed"
    )
    target: str = Field(description="DICOMweb root it was sent to")
    series_instance_uid: str
    sop_instance_uid: str = Field(description="one per (study, report version)")
    version: str = Field(description="hash of what the report says")
    instance_number: int = 1
    supersedes: list[str] = Field(
        default_factory=list, description="earlier radflow SRs of the study it replaces"
    )
    attempts: int = Field(0, description="STOW-RS requests made, retries included")
    error: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ReviewState(BaseModel):
    """Where a flagged study's radiologist review stands (tasks/review: the review flow
    writes it; the verdict itself is studies/<uid>/review.json)."""

    status: Literal["requested", "pending", "done", "expired", "not_requested"] = Field(
        description="requested: a review run exists; pending: its page is posted and it waits "
        "for input; done: verdict in review.json; expired: unanswered in time; not_requested: "
        "no review run could be created (see reason)"
    )
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    attempt: int = Field(1, ge=1, description="review runs asked for this study so far")
    requested_at: datetime | None = None
    expires_at: datetime | None = Field(None, description="when an unanswered run fails")
    reviewed_at: datetime | None = None
    reviewer: str | None = Field(None, description="the reviewer's initials")
    abnormal: bool | None = None
    urgency: Urgency | None = None
    not_assessable: bool | None = None
    verdict: str | None = Field(None, description="key of review.json under DEST")
    reason: str | None = Field(None, description="why no review run was created")


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
    context_dropped: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="per context field, how many distinct header values were not sent: "
        "unknown (outside the field's vocabulary) and over_cap (past the per-field cap); "
        "never the values",
    )
    log_id: str | None = Field(
        None,
        description="how the logs, Prefect artifacts and run names of the run that wrote this "
        "report name the study: a keyed pseudonym (privacy.log_uids: hash) or the UID (plain)",
    )
    inputs_fingerprint: str = Field(description="hash of the input objects; reruns skip on match")
    prompt_version: str
    cost_usd: float = 0.0
    simulated: bool = False
    radflow_version: str
    impression: Impression | None = Field(None, description="model-written narrative, optional")
    provenance: Provenance | None = None
    outputs: list[str] = Field(default_factory=list, description="files written beside report.json")
    run_id: str | None = Field(
        None, description="the run that wrote report.json, .md, .sr.dcm and .fhir.json"
    )
    fetched_bytes: int = Field(0, description="bytes of the source instances read to render it")
    published: Published | None = Field(None, description="STOW-RS of the SR, when configured")
    review: ReviewState | None = Field(None, description="the radiologist review, if requested")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ErrorRecord(BaseModel):
    source: str
    reason: str
    kind: str
    stage: str
    study_instance_uid: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ReviewEntry(BaseModel):
    """One line of the run's review queue (also DEST/review/<uid>.json)."""

    study_instance_uid: str
    abnormal: bool | None
    urgency: Urgency | None
    agreement: float
    reasons: list[str]
    report: str = Field(description="key of report.json under DEST")


class ModelStats(BaseModel):
    """One panel model's readings in a run (the provider comparison: tasks/screening/compare.py).
    Every field adds up across shards; latencies are kept as counts per logarithmic bucket."""

    provider: str = ""
    model_id: str = ""
    endpoint_host: str | None = None
    readings: int = Field(0, description="readings of this model in reports, cached ones too")
    cached: int = Field(0, description="readings served from the cache (no call)")
    calls: int = Field(0, description="readings that called the model (readings - cached)")
    answered: int = Field(0, description="calls that ended in a valid reading")
    failed: int = Field(0, description="calls that ended without a reading, refusals apart")
    refused: int = Field(0, description="calls the model refused")
    fallback: int = Field(0, description="calls answered by the configured fallback model")
    requests: int = Field(0, description="HTTP requests of the calls (retries, re-asks)")
    retried: int = Field(0, description="requests beyond one per call: requests - calls")
    input_tokens: int = 0
    output_tokens: int = 0
    image_tokens: int = Field(0, description="estimated image input tokens of the calls")
    cost_usd: float = Field(0.0, description="cost of the calls whose cost is known")
    unknown_cost: int = Field(0, description="calls whose answer had no usage (cost unknown)")
    compared: int = Field(0, description="studies with this model's reading and a consensus")
    agreed: int = Field(0, description="of those, readings whose abnormal matches the consensus")
    latency_max_ms: float = 0.0
    latency_buckets: dict[int, int] = Field(
        default_factory=dict,
        description="calls per latency bucket k: [1.1^k, 1.1^(k+1)) ms (mergeable; bounded)",
    )


class RunSummary(BaseModel):
    run_id: str
    source: str
    dest: str
    studies: int = 0
    reported: int = 0
    skipped: int = 0
    claimed_elsewhere: int = Field(
        0,
        description="studies left to another run: it held their claim, or had reported them "
        "by the time this run came to them (not read here, not errors)",
    )
    degraded: int = 0
    needs_review: int = 0
    errors: int = 0
    model_calls: int = 0
    cache_hits: int = Field(0, description="readings served from the cache (no call)")
    requests: int = Field(0, description="HTTP requests to model providers, retries included")
    cached_cost_usd: float = Field(0.0, description="cost of cached readings, not paid again")
    unknown_cost_readings: int = Field(
        0, description="paid readings whose answer had no usage: cost_usd leaves them out"
    )
    stopped: str | None = Field(
        None,
        description="why the run stopped early: a provider rejected a key or model id (the "
        "studies not read have error records, no report: a rerun reads them)",
    )
    input_tokens: int = 0
    estimated_input_tokens: int = Field(
        0, description="input tokens of the paid readings as estimated before the calls"
    )
    output_tokens: int = 0
    cost_usd: float = 0.0
    simulated: bool = False
    started_at: datetime
    finished_at: datetime | None = None
    fleiss_kappa: float | None = Field(
        None, description="Fleiss' kappa of the panel on abnormal over the studies read"
    )
    kappa_studies: int = Field(0, description="studies every model read (kappa's subjects)")
    panel_votes: list[list[bool | None]] = Field(
        default_factory=list,
        description="per study read, each model's abnormal (null: no reading): what a sharded "
        "run's parent computes the kappa over the whole run from",
    )
    review_queue: list[ReviewEntry] = Field(default_factory=list, description="needs_review")
    shards: list[str] = Field(
        default_factory=list, description="flow run ids of the child runs of a sharded run"
    )
    fetched_bytes: int = Field(0, description="bytes of source instances read to render images")
    fetched_bytes_by_study: dict[str, int] = Field(
        default_factory=dict, description="the same, per StudyInstanceUID"
    )
    discovery_bytes: int = Field(
        0, description="bytes a DICOMweb source sent to find the studies (searches, metadata)"
    )
    header_reads: int = Field(
        0,
        description="object headers read to find the studies (a shard run reads none: its "
        "parent's manifest lists them)",
    )
    published: int = Field(0, description="SRs stored on the publish target (or already there)")
    publish_failed: list[str] = Field(
        default_factory=list, description="studies whose SR could not be published"
    )
    reviews_requested: int = Field(0, description="review flow runs created (review.requests)")
    models: dict[str, ModelStats] = Field(
        default_factory=dict, description="the provider comparison: per panel model name"
    )
