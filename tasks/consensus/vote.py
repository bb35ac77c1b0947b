"""Combine the panel's readings into one deterministic consensus a reviewer can check."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from tasks.core.config import ReviewConfig
from tasks.core.schema import Consensus, MergedItem, ModelReading, ReviewCode, ReviewReason, Urgency

__all__ = ["KAPPA_MODULE", "RULE", "build_consensus", "merge_items", "panel_kappa", "reason_text"]

logger = logging.getLogger(__name__)

RULE = "weighted-majority-v1"
KAPPA_MODULE = "statsmodels.stats.inter_rater"  # Fleiss' kappa; slow to import, so lazily


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


def reason_text(reason: ReviewReason) -> str:
    """The English sentence for a review reason (report.json's ``review_reasons``)."""
    match reason.code:
        case ReviewCode.MODEL_FAILED:
            return f"no reading from {', '.join(reason.models)}"
        case ReviewCode.NO_READING:
            return "no model produced a reading"
        case ReviewCode.DISAGREE:
            return "models disagree on abnormal"
        case ReviewCode.IMMEDIATE:
            return f"{', '.join(reason.models)} rate(s) it immediate"
        case ReviewCode.LOW_AGREEMENT:
            return f"agreement {reason.value:.2f} is below {reason.threshold:.2f}"
    raise ValueError(f'unknown review code "{reason.code}"')


def _weight(model: str, weights: Mapping[str, float]) -> float:
    value = float(weights.get(model, 1.0))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f'weight of model "{model}" must be a finite number >= 0, got {value}')
    return value


def build_consensus(
    readings: Sequence[ModelReading],
    weights: Mapping[str, float],
    review: ReviewConfig,
    weights_source: str = "config",
) -> Consensus:
    """Weighted vote on ``abnormal``; a tie counts as abnormal (the safe side).

    - score: weighted share of abnormal votes among the successful readings, in [0, 1]
      (a model missing from ``weights`` weighs 1; all-zero weights fall back to one vote each);
    - urgency: the most urgent urgency any successful reading gives (safety rule);
    - agreement: share of successful readings that agree with the vote;
    - needs_review, each rule switchable in ``review``: a model failed or refused
      (``on_degraded``), models disagree (``on_disagreement``), any says immediate
      (``on_immediate``), agreement below ``min_agreement``; always when no model answered.
    """
    ok = [r for r in readings if r.ok and r.abnormal is not None]
    failed = [r.model for r in readings if not (r.ok and r.abnormal is not None)]
    details: list[ReviewReason] = []
    if failed and review.on_degraded:
        details.append(ReviewReason(code=ReviewCode.MODEL_FAILED, models=failed))
    if not ok:
        details.append(ReviewReason(code=ReviewCode.NO_READING, models=failed))
        return Consensus(
            abnormal=None,
            urgency=None,
            score=None,
            agreement=0.0,
            needs_review=True,
            review_reasons=[reason_text(d) for d in details],
            review_details=details,
            weights={r.model: _weight(r.model, weights) for r in readings},
            weights_source=weights_source,
            rule=RULE,
        )
    used = {r.model: _weight(r.model, weights) for r in ok}
    total = sum(used.values())
    if total > 0:
        score = sum(used[r.model] for r in ok if r.abnormal) / total
    else:  # every weight is zero: fall back to an unweighted vote
        score = sum(1 for r in ok if r.abnormal) / len(ok)
    abnormal = score >= 0.5
    agreement = sum(1 for r in ok if r.abnormal == abnormal) / len(ok)
    urgency = max((r.urgency or Urgency.NORMAL for r in ok), key=lambda u: u.rank)
    disagree = len({r.abnormal for r in ok}) > 1
    if disagree and review.on_disagreement:
        details.append(ReviewReason(code=ReviewCode.DISAGREE, models=[r.model for r in ok]))
    if urgency is Urgency.IMMEDIATE and review.on_immediate:
        immediate = [r.model for r in ok if r.urgency is Urgency.IMMEDIATE]
        details.append(ReviewReason(code=ReviewCode.IMMEDIATE, models=immediate))
    if agreement < review.min_agreement and not (disagree and review.on_disagreement):
        details.append(
            ReviewReason(
                code=ReviewCode.LOW_AGREEMENT,
                value=round(agreement, 4),
                threshold=review.min_agreement,
            )
        )
    return Consensus(
        abnormal=abnormal,
        urgency=urgency,
        score=round(score, 4),
        agreement=round(agreement, 4),
        needs_review=bool(details),
        review_reasons=[reason_text(d) for d in details],
        review_details=details,
        findings=merge_items(ok, "findings"),
        differentials=merge_items(ok, "differentials"),
        recommended_exams=merge_items(ok, "recommended_exams"),
        weights=used,
        weights_source=weights_source,
        rule=RULE,
    )


def panel_kappa(votes: Iterable[Sequence[bool | None]]) -> tuple[float | None, int]:
    """Fleiss' kappa of the panel on abnormal (statsmodels), over the studies every model
    read (Fleiss 1971 needs the same number of raters per subject). Returns (kappa, subjects);
    kappa is None with fewer than two raters or two subjects, or when every vote is the same
    category (chance agreement is then 1 and kappa is undefined)."""
    rows = [list(v) for v in votes if v and all(x is not None for x in v)]
    if rows:
        width = max(len(r) for r in rows)
        rows = [r for r in rows if len(r) == width]
    if len(rows) < 2 or len(rows[0]) < 2:
        return None, len(rows)
    # imported here: statsmodels takes seconds to import, and every flow run imports this
    # module (the screening flow imports it in a thread early in runs that will need it)
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    table, _ = aggregate_raters(np.asarray(rows, dtype=int), n_cat=2)
    if (table.sum(axis=0) == 0).any():
        return None, len(rows)
    return round(float(fleiss_kappa(table, method="fleiss")), 4), len(rows)
