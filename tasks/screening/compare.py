"""The provider comparison: per panel model, what its readings of a run cost and how they went
(calls, answers, failures, refusals, retries, latency percentiles, tokens, cost, agreement with
the consensus), added study by study, merged across shards, and laid out as table rows.

Latencies are kept as counts per logarithmic bucket (bucket k holds [1.1^k, 1.1^(k+1)) ms),
not as samples: at most ~150 buckets up to 10 minutes whatever the run's size, and two runs'
buckets add exactly, so a sharded run's percentiles are those of all its calls. A percentile
is read as its bucket's geometric middle (within ±5 % of the true value), capped at the max."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from tasks.core.schema import ModelStats, Report

__all__ = [
    "BUCKET_RATIO",
    "add_report",
    "bucket_of",
    "comparison_rows",
    "cost_note",
    "latency_percentile",
    "latency_samples",
    "merge_models",
]

BUCKET_RATIO = 1.1
_LOG_RATIO = math.log(BUCKET_RATIO)


def bucket_of(latency_ms: float) -> int:
    """The latency bucket of ``latency_ms`` (under 1 ms: bucket 0)."""
    return max(0, math.floor(math.log(max(latency_ms, 1.0)) / _LOG_RATIO))


def latency_percentile(stats: ModelStats, q: float) -> float | None:
    """The ``q``-quantile (0..1) of the calls' latencies in ms; None without calls."""
    total = sum(stats.latency_buckets.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for k in sorted(stats.latency_buckets):
        seen += stats.latency_buckets[k]
        if seen >= rank:
            middle = BUCKET_RATIO ** (k + 0.5) if k else 1.0
            return min(middle, stats.latency_max_ms)
    return stats.latency_max_ms  # unreachable: the ranks add up to total


def add_report(models: dict[str, ModelStats], report: Report) -> None:
    """Add a reported study's readings into ``models`` (keyed by panel model name)."""
    consensus = report.consensus.abnormal
    for r in report.readings:
        stats = models.setdefault(r.model, ModelStats())
        if not stats.provider or r.fallback is None:  # the model's own identity
            stats.provider, stats.model_id = r.provider, r.model_id
            stats.endpoint_host = r.endpoint_host
        stats.readings += 1
        if r.ok and r.abnormal is not None and consensus is not None:
            stats.compared += 1
            stats.agreed += r.abnormal == consensus
        if r.cached:
            stats.cached += 1
            continue
        stats.calls += 1
        stats.answered += r.ok
        stats.refused += r.refusal
        stats.failed += not r.ok and not r.refusal
        stats.fallback += r.fallback is not None
        stats.requests += r.requests
        stats.retried += max(0, r.requests - 1)
        stats.input_tokens += r.input_tokens
        stats.output_tokens += r.output_tokens
        stats.image_tokens += r.estimated_image_tokens
        if r.cost_usd is None:  # no usage in the answer: cost unknown, not zero
            stats.unknown_cost += 1
        else:
            stats.cost_usd = round(stats.cost_usd + r.cost_usd, 6)
        k = bucket_of(r.latency_ms)
        stats.latency_buckets[k] = stats.latency_buckets.get(k, 0) + 1
        stats.latency_max_ms = max(stats.latency_max_ms, round(r.latency_ms, 1))


def merge_models(into: dict[str, ModelStats], other: Mapping[str, ModelStats]) -> None:
    """Add a shard's comparison into ``into``: every count and cost adds, buckets add,
    the max is the larger."""
    for name, theirs in other.items():
        mine = into.get(name)
        if mine is None:
            into[name] = theirs.model_copy(deep=True)
            continue
        for field, value in theirs:
            if field == "latency_buckets":
                for k, n in value.items():
                    mine.latency_buckets[k] = mine.latency_buckets.get(k, 0) + n
            elif field == "latency_max_ms":
                mine.latency_max_ms = max(mine.latency_max_ms, value)
            elif field == "cost_usd":
                mine.cost_usd = round(mine.cost_usd + value, 6)
            elif isinstance(value, int):
                setattr(mine, field, getattr(mine, field) + value)
            elif not getattr(mine, field):  # identity: the first shard's that has one
                setattr(mine, field, value)


def cost_note(row: Mapping[str, Any]) -> str:
    """How a row's cost is to be read beside its figure: "" when every call's cost is known,
    " (N of M calls)" when the cost covers only N of the M calls (the others had no usage)."""
    calls, known = row["calls"], row["cost_known"]
    return f" ({known} of {calls} calls)" if known < calls else ""


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def comparison_rows(
    models: Mapping[str, ModelStats], run: str | None = None
) -> list[dict[str, Any]]:
    """One row per model (a table artifact's rows, the CLI's table): ``run`` first when
    given (``radflow runs compare``).

    Cost is over the calls whose answer had usage: ``cost_known`` of ``calls``. The others'
    cost is unknown, not zero, so ``cost_usd`` is the known calls' sum and
    ``cost_per_study_usd`` that sum over ``cost_known`` (partial when ``cost_known < calls``),
    and both are None when calls were made and no cost is known."""
    rows = []
    for name, s in models.items():
        known = s.calls - s.unknown_cost
        row: dict[str, Any] = {"run": run} if run is not None else {}
        row |= {
            "model": name,
            "provider": s.provider,
            "model_id": s.model_id,
            "host": s.endpoint_host or "-",
            "calls": s.calls,
            "answered": s.answered,
            "failed": s.failed,
            "refused": s.refused,
            "retried": s.retried,
            "cached": s.cached,
            "p50_ms": _ms(latency_percentile(s, 0.50)),
            "p95_ms": _ms(latency_percentile(s, 0.95)),
            "max_ms": s.latency_max_ms if s.calls else None,
            "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
            "image_tokens": s.image_tokens,
            "cost_usd": round(s.cost_usd, 6) if known or not s.calls else None,
            "cost_known": known,
            "cost_per_study_usd": round(s.cost_usd / known, 6) if known else None,
            "agreement": round(s.agreed / s.compared, 3) if s.compared else None,
        }
        rows.append(row)
    return rows


def latency_samples(stats: ModelStats) -> Iterable[tuple[float, int]]:
    """(bucket middle in ms, calls) per bucket from the fastest call's to the slowest's
    (empty ones as 0), in order: for plots."""
    if not stats.latency_buckets:
        return
    for k in range(min(stats.latency_buckets), max(stats.latency_buckets) + 1):
        yield (BUCKET_RATIO ** (k + 0.5) if k else 1.0), stats.latency_buckets.get(k, 0)
