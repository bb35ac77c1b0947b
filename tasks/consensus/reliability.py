"""Consensus weights from measured reliability: the log-odds weight of a model and the
reliability.json (written by the evaluation flow) that the screening consensus reads back."""

from __future__ import annotations

import json
import math

from tasks.core.config import Settings
from tasks.core.errors import ConfigError, RadflowError
from tasks.storage import open_store, split_uri

__all__ = [
    "MAX_WEIGHT",
    "METHOD",
    "load_reliability",
    "log_odds_weight",
    "model_weights",
]

METHOD = "log-diagnostic-odds-v1"
MAX_WEIGHT = 10.0  # ≈ sensitivity and specificity of 0.993 each; bounds one model's say


def log_odds_weight(sensitivity: float, specificity: float) -> float:
    """Vote weight ``log(sens·spec / ((1−sens)(1−spec)))``, the log diagnostic odds ratio,
    clipped to [0, MAX_WEIGHT].

    With independent errors the Bayes-optimal vote adds ``log(sens/(1−spec))`` for every
    abnormal call and subtracts ``log(spec/(1−sens))`` for every normal one; a single weight
    per model (what the weighted-majority consensus uses) keeps the sum of the two, so models
    vote in proportion to how well they separate abnormal from normal (Nitzan & Paroush 1982
    for the symmetric case). A model at chance (or worse) gets 0: it no longer votes.
    """
    if not (0 < sensitivity < 1 and 0 < specificity < 1):
        raise ValueError(
            f"sensitivity and specificity must lie in (0, 1), got {sensitivity}, {specificity}"
        )
    w = math.log(sensitivity * specificity / ((1 - sensitivity) * (1 - specificity)))
    return round(min(max(w, 0.0), MAX_WEIGHT), 4)


def load_reliability(uri: str) -> dict[str, float]:
    """{model: weight} from a reliability.json (local path or s3 uri)."""
    try:
        parent, name = split_uri(uri)
        raw = open_store(parent).read_bytes(name)
    except FileNotFoundError as exc:
        raise ConfigError(f'reliability file "{uri}" does not exist') from exc
    except RadflowError as exc:
        raise ConfigError(f'reliability file "{uri}" cannot be read: {exc}') from exc
    try:  # the file's text and shape: JSON with {"models": {name: {"weight": number}}}
        data = json.loads(raw)
        weights = {str(m): float(v["weight"]) for m, v in data["models"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f'reliability file "{uri}" is not a radflow reliability.json: {exc}',
            hint="point `reliability:` at DEST/reliability.json of `radflow evaluate`",
        ) from exc
    bad = {m: w for m, w in weights.items() if not (math.isfinite(w) and 0 <= w <= 100)}
    if bad:
        raise ConfigError(f'reliability file "{uri}" holds invalid weights: {bad}')
    return weights


def model_weights(settings: Settings) -> tuple[dict[str, float], str]:
    """(weights, source) for the consensus: the configured weights, with those of the models
    named in ``settings.reliability`` replaced by their measured ones."""
    weights = {m.name: m.weight for m in settings.models}
    if not settings.reliability:
        return weights, "config"
    measured = load_reliability(settings.reliability)
    weights.update({m: w for m, w in measured.items() if m in weights})
    return weights, settings.reliability
