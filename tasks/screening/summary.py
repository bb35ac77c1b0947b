"""A run's accounting, in one place: what a screened study's outcome is, what a study cost, and
the :class:`Tally` that adds each outcome (or a shard's summary) into the run summary and
computes the panel's kappa at the end."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.consensus.vote import panel_kappa
from tasks.core.privacy import LogNames
from tasks.core.schema import ErrorRecord, Impression, ModelReading, Report, RunSummary
from tasks.reports.write import review_entry
from tasks.screening.compare import add_report, merge_models
from tasks.screening.monitor import result_row

__all__ = ["StudyOutcome", "Tally", "study_cost"]

logger = logging.getLogger(__name__)

# Fields of a shard's summary that are not added into the parent's: the parent counted its
# studies and skips at discovery, a kappa is not additive (the parent's is computed over the
# shards' votes, each shard's summary keeps its own), and the parent lists its shards itself.
# The provider comparison (``models``) merges by its own rule (tasks.screening.compare).
_NOT_SUMMED = frozenset(
    {"studies", "skipped", "fleiss_kappa", "kappa_studies", "panel_votes", "shards", "models"}
)


@dataclass
class StudyOutcome:
    """What the flow needs to know about a screened study (the report itself is in DEST)."""

    study_instance_uid: str
    report: Report | None
    errors: list[ErrorRecord] = field(default_factory=list)
    log_id: str = ""  # how logs and artifacts name the study (tasks.core.privacy)
    elsewhere: str | None = None  # why another run has the study: not read here


def study_cost(readings: Sequence[ModelReading], impression: Impression | None) -> float:
    """A study's cost in USD (its report's ``cost_usd``): every reading, cached ones at what
    they cost when they were made, and the synthesis call."""
    known = sum(r.cost_usd or 0.0 for r in readings)  # an unknown cost is counted apart
    return round(known + ((impression.cost_usd or 0.0) if impression else 0), 6)


class Tally:
    """The run summary as a run's studies end: :meth:`add` a study's outcome, :meth:`merge`
    a shard's summary, :meth:`finish` for the panel's kappa. Also keeps the rows of the
    results table (:func:`tasks.screening.monitor.result_row`) of the studies read here."""

    def __init__(self, summary: RunSummary, names: LogNames) -> None:
        self.summary = summary
        self.names = names
        self.done = 0  # outcomes added
        self.rows: list[dict[str, Any]] = []
        self._votes: list[list[bool | None]] = []  # per study read: each model's abnormal

    def add(self, outcome: StudyOutcome) -> None:
        """Count a study screened in this run: its error records, or its report's status,
        review flag, model calls, tokens, cost, fetched bytes and publishing."""
        s = self.summary
        self.done += 1
        s.errors += len(outcome.errors)
        s.claimed_elsewhere += outcome.elsewhere is not None
        report = outcome.report
        if report is None:
            return
        s.reported += 1
        s.degraded += report.status == "degraded"
        s.needs_review += report.consensus.needs_review
        if report.consensus.needs_review:
            s.review_queue.append(review_entry(report))
        paid = [r for r in report.readings if not r.cached]
        s.model_calls += len(paid)
        s.cache_hits += len(report.readings) - len(paid)
        s.requests += sum(r.requests for r in paid)
        s.input_tokens += sum(r.input_tokens for r in paid)
        s.estimated_input_tokens += sum(r.estimated_input_tokens for r in paid)
        s.output_tokens += sum(r.output_tokens for r in paid)
        s.cost_usd = round(s.cost_usd + sum(r.cost_usd or 0.0 for r in paid), 6)
        s.unknown_cost_readings += sum(not r.cost_known for r in paid)
        cached = sum(r.cost_usd or 0.0 for r in report.readings if r.cached)
        s.cached_cost_usd = round(s.cached_cost_usd + cached, 6)
        if report.impression is not None:  # the synthesis call (never cached)
            s.model_calls += 1
            s.requests += report.impression.requests
            s.input_tokens += report.impression.input_tokens
            s.output_tokens += report.impression.output_tokens
            s.cost_usd = round(s.cost_usd + (report.impression.cost_usd or 0.0), 6)
            s.unknown_cost_readings += not report.impression.cost_known
        s.simulated = s.simulated or report.simulated
        s.fetched_bytes += report.fetched_bytes
        s.fetched_bytes_by_study[report.study_instance_uid] = report.fetched_bytes
        if report.published is not None:
            if report.published.state == "failed":
                s.publish_failed.append(report.study_instance_uid)
            else:
                s.published += 1
        add_report(s.models, report)
        self._votes.append([r.abnormal if r.ok else None for r in report.readings])
        self.rows.append(result_row(report, s.dest, self.names))

    def add_earlier(self, report: dict) -> None:
        """The panel's votes on a study a re-run shard skips: its crashed run reported it
        (``report``: the report.json), so it is one of this run's kappa subjects."""
        self._votes.append(
            [r.get("abnormal") if r.get("ok") else None for r in report.get("readings", [])]
        )

    def merge(self, shard: RunSummary) -> None:
        """Add a shard's counts, costs, review queue and votes, and list the shard's run."""
        s = self.summary
        self._votes.extend(shard.panel_votes)
        for name, value in shard:
            if name in _NOT_SUMMED:
                continue
            current = getattr(s, name)
            if isinstance(value, bool):
                setattr(s, name, current or value)
            elif isinstance(value, int):
                setattr(s, name, current + value)
            elif isinstance(value, float):
                setattr(s, name, round(current + value, 6))
            elif isinstance(value, list):
                current.extend(value)
            elif isinstance(value, dict):
                current.update(value)
        # a re-run shard (its first run crashed) skips what that run reported: reported here
        # (its votes are in the shard's, add_earlier)
        s.reported += shard.skipped
        merge_models(s.models, shard.models)
        s.shards.append(shard.run_id)

    def add_unread(self, records: int) -> None:
        """Count a study of a failed shard: the error records written for it, or none when
        it was reported (by the shard, before it failed)."""
        self.summary.errors += records
        self.summary.reported += records == 0

    def finish(self) -> RunSummary:
        """The summary with the panel's Fleiss' kappa over the studies read here or in its
        shards (each shard's summary has its own too), and the votes it was computed from."""
        self.summary.fleiss_kappa, self.summary.kappa_studies = panel_kappa(self._votes)
        self.summary.panel_votes = list(self._votes)
        return self.summary
