"""A report's version: a hash of what it says (not when, how fast or at what cost it was
said), which makes its SR's SOPInstanceUID: the same report published twice is one instance."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.core.schema import Report

__all__ = ["report_version"]


def report_version(report: Report) -> str:
    """16 hex digits over the study, language, consensus, each model's reading (not its
    tokens, latency, cost or cache state), the images read and the impression's text."""
    readings = [
        r.model_dump(
            mode="json",
            include={
                "model", "model_id", "ok", "abnormal", "urgency", "findings",
                "differentials", "recommended_exams", "rationale", "refusal", "fallback",
            },
        )
        for r in report.readings
    ]  # fmt: skip
    said = {
        "study": report.study_instance_uid,
        "language": report.language,
        "consensus": report.consensus.model_dump(mode="json"),
        "readings": readings,
        "images": [(i.sop_instance_uid, i.sha256, i.frame) for i in report.images],
        "impression": report.impression.text if report.impression else None,
    }
    text = json.dumps(said, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
