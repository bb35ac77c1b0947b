"""Combine the panel's readings into one deterministic consensus a reviewer can check."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tasks.config import ReviewConfig
from tasks.schema import Consensus, MergedItem, ModelReading, Urgency

__all__ = ["build_consensus", "merge_items"]

RULE = "weighted-majority-v1"


def merge_items(readings: Iterable[ModelReading], field: str) -> list[MergedItem]:
    """Merge a list field across readings (case- and space-insensitive), keeping which
    models support each item; most supported first, then first seen."""
    merged: dict[str, MergedItem] = {}
    for r in readings:
        for text in getattr(r, field):
            key = " ".join(text.lower().split())
            if not key:
                continue
            item = merged.setdefault(key, MergedItem(text=text.strip(), models=[]))
            if r.model not in item.models:
                item.models.append(r.model)
    return sorted(merged.values(), key=lambda i: -len(i.models))


def build_consensus(
    readings: list[ModelReading], weights: Mapping[str, float], review: ReviewConfig
) -> Consensus:
    """Weighted vote on ``abnormal``; ties count as abnormal (the safe side).

    - score: weighted share of abnormal votes among the successful readings, in [0, 1];
    - urgency: the most urgent urgency any model gives (safety rule);
    - agreement: share of successful readings that agree with the vote;
    - needs_review: models disagree, a model failed, any says immediate, or agreement is
      below ``review.min_agreement``.
    """
    ok = [r for r in readings if r.ok and r.abnormal is not None]
    failed = [r.model for r in readings if not r.ok]
    reasons: list[str] = []
    if failed:
        reasons.append(f"no reading from {', '.join(failed)}")
    if not ok:
        reasons.append("no model produced a reading")
        return Consensus(
            abnormal=None,
            urgency=None,
            score=None,
            agreement=0.0,
            needs_review=True,
            review_reasons=reasons,
            rule=RULE,
        )
    used = {r.model: float(weights.get(r.model, 1.0)) for r in ok}
    total = sum(used.values())
    if total > 0:
        score = sum(used[r.model] for r in ok if r.abnormal) / total
    else:  # every weight is zero: fall back to an unweighted vote
        score = sum(1 for r in ok if r.abnormal) / len(ok)
    abnormal = score >= 0.5
    agreement = sum(1 for r in ok if r.abnormal == abnormal) / len(ok)
    urgency = max((r.urgency or Urgency.NORMAL for r in ok), key=lambda u: u.rank)
    if len({r.abnormal for r in ok}) > 1:
        reasons.append("models disagree on abnormal")
    if urgency is Urgency.IMMEDIATE:
        reasons.append("a model rates it immediate")
    if agreement < review.min_agreement and "models disagree on abnormal" not in reasons:
        reasons.append(f"agreement {agreement:.2f} is below {review.min_agreement:.2f}")
    return Consensus(
        abnormal=abnormal,
        urgency=urgency,
        score=round(score, 4),
        agreement=round(agreement, 4),
        needs_review=bool(reasons),
        review_reasons=reasons,
        findings=merge_items(ok, "findings"),
        differentials=merge_items(ok, "differentials"),
        recommended_exams=merge_items(ok, "recommended_exams"),
        weights=used,
        rule=RULE,
    )
