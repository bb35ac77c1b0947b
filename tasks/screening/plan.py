"""What a screening run reads and what becomes of what it could not: the studies to read (those
not reported yet), their shards, and the error records of studies whose task or shard failed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tasks.core.errors import SymlinkEscape
from tasks.core.privacy import LogNames
from tasks.ingest.discover import Study
from tasks.pacs.publish import PublishTarget, needs_publishing
from tasks.reports.write import reported, study_errors, write_error, write_errors
from tasks.screening.summary import StudyOutcome
from tasks.storage import Store

__all__ = [
    "already_reported",
    "earlier_reports",
    "fail_unread",
    "fail_unreported",
    "plan_shards",
    "to_read",
]

logger = logging.getLogger(__name__)


def already_reported(dest: Store, study: Study, publish: PublishTarget | None = None) -> bool:
    """Reported from the same inputs (and, with ``publish``, its SR is on that server)."""
    try:
        previous = reported(dest, study.study_instance_uid, study.fingerprint)
    except SymlinkEscape:  # the study's folder leads out of DEST: screen_study records it
        return False
    return previous is not None and not needs_publishing(previous, publish)


def to_read(
    dest: Store, studies: Sequence[Study], force: bool, publish: PublishTarget | None
) -> list[Study]:
    """The studies a run reads: all with ``force``, else those not already reported."""
    return [s for s in studies if force or not already_reported(dest, s, publish)]


def earlier_reports(dest: Store, studies: Sequence[Study], pending: Sequence[Study]) -> list[dict]:
    """The report.json of each of ``studies`` not ``pending``: in a re-run shard, what its
    crashed run reported."""
    read = {s.study_instance_uid for s in pending}
    found = (
        reported(dest, s.study_instance_uid, s.fingerprint)
        for s in studies
        if s.study_instance_uid not in read
    )
    return [r for r in found if r is not None]


def plan_shards(studies: Sequence[Study], size: int) -> list[list[Study]]:
    """Split studies into shards of at most ``size`` studies, in order (a study never
    straddles two shards); each shard's manifest is written by the parent run."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [list(studies[i : i + size]) for i in range(0, len(studies), size)]


def fail_unreported(dest: Store, study: Study, reason: str) -> int:
    """Error records for a study of a failed shard unless it was reported; how many."""
    if already_reported(dest, study):
        return 0
    records = study_errors(study, reason)
    for record in records:
        write_error(dest, record)
    return len(records)


def fail_unread(dest: Store, study: Study, reason: str, names: LogNames) -> StudyOutcome:
    """The outcome of a study whose ``screen-studies`` task run failed for good before it was
    read: its error records, written under DEST."""
    records = study_errors(study, reason)
    write_errors(dest, records)
    uid = study.study_instance_uid
    return StudyOutcome(uid, None, records, names.study(uid))
