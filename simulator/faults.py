"""The simulator's injected faults (``--faults``): their spec, per model, and the seeded draw
of one per request. Each kind is what a real provider or gateway does (docs/models.md,
"Provider behaviour"); a TEST DOUBLE's misbehaviour, on purpose."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

__all__ = [
    "ALL_MODELS",
    "CODES",
    "FAULT_KINDS",
    "REJECTIONS",
    "Faults",
    "applicable",
    "parse_faults",
]

logger = logging.getLogger(__name__)

ALL_MODELS = "*"
FAULT_KINDS = {
    "429": "rate limited, with Retry-After",
    "500": "server error",
    "529": "Anthropic's overloaded_error",
    "timeout": "no answer until the client gives up",
    "malformed": "an answer that is not the schema (cut JSON, wrong tool input)",
    "refusal": "a structured refusal: OpenAI message.refusal, Anthropic stop_reason refusal",
    "text_refusal": "a medical-advice refusal in plain text instead of a reading",
    "length": "output cut by max_tokens (finish_reason length / stop_reason max_tokens)",
    "no_usage": "an answer without usage (token counts)",
    "401": "authentication_error: the key is not valid",
    "403": "permission_error: the key may not use the model",
    "404": "not_found_error / model_not_found: the provider does not know the model id",
    "bad_image": "400 for an image the provider rejects (a request with an image only)",
    "no_json_schema": "400 for response_format json_schema, as gateways without it answer "
    "(a request that asks for json_schema only)",
}


def parse_faults(spec: str | None) -> dict[str, dict[str, float]]:
    """``429:0.1,refusal:0.02,401:1@claude-sonnet-4-6`` → {model or ``*``: {kind: rate}}.

    ``KIND:RATE`` applies to every model, ``KIND:RATE@MODEL`` to requests naming that model
    id only (replacing what ``*`` says of the same kind)."""
    rates: dict[str, dict[str, float]] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        item, _, model = part.partition("@")
        kind, _, rate = item.partition(":")
        if kind not in FAULT_KINDS:
            raise ValueError(f'unknown fault "{kind}" (known: {", ".join(FAULT_KINDS)})')
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f'fault "{kind}" needs a rate like {kind}:0.1, got "{part}"') from None
        if not 0 <= value <= 1:
            raise ValueError(f'fault rate for "{kind}" must be in [0, 1], got {value}')
        rates.setdefault(model.strip() or ALL_MODELS, {})[kind] = value
    for model in rates:
        total = sum(Faults(rates).for_model(model).values())
        if total > 1 + 1e-9:
            raise ValueError(f'fault rates of "{model}" add up to {total:g}, more than 1: {spec}')
    return rates


@dataclass
class Faults:
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    retry_after: float = 1.0
    timeout_sleep: float = 60.0
    attempts: dict[str, int] = field(default_factory=dict)

    def for_model(self, model: str) -> dict[str, float]:
        """The rates that apply to ``model``: every model's, then its own."""
        return {**self.rates.get(ALL_MODELS, {}), **self.rates.get(model, {})}

    def draw(self, seed: int, model: str, body: bytes) -> str | None:
        """Seeded per request body and attempt: a retried request draws again."""
        key = hashlib.sha256(body).hexdigest()
        self.attempts[key] = self.attempts.get(key, 0) + 1
        digest = hashlib.sha256(f"{seed}\0{key}\0{self.attempts[key]}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        rates = self.for_model(model)
        for kind in FAULT_KINDS:
            edge += rates.get(kind, 0.0)
            if u < edge:
                return kind
        return None


# Faults answered with an error before any reading: (status, error type, message).
REJECTIONS = {
    "401": (401, "authentication_error", "invalid x-api-key (injected)"),
    "403": (403, "permission_error", "this key may not use model {model} (injected)"),
    "404": (404, "not_found_error", "model: {model} does not exist (injected)"),
    "bad_image": (
        400,
        "invalid_request_error",
        "messages.0.content.0.image.source.base64: image exceeds 5 MB maximum (injected)",
    ),
    "no_json_schema": (
        400,
        "invalid_request_error",
        "response_format type 'json_schema' is not supported by this gateway; use "
        "'json_object' (injected)",
    ),
}
CODES = {"404": "model_not_found", "no_json_schema": "unsupported_parameter"}


def _has_image(body: dict) -> bool:
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, list) and any(
            p.get("type") in ("image", "image_url") for p in content
        ):
            return True
    return False


def applicable(fault: str | None, body: dict, protocol: str) -> str | None:
    """The drawn fault, or None where it cannot happen to this request: a rejected image
    needs an image, a missing json_schema needs an OpenAI request asking for it."""
    if fault == "bad_image" and not _has_image(body):
        return None
    if fault == "no_json_schema":
        wants = protocol == "openai" and (body.get("response_format") or {}).get("type")
        return fault if wants == "json_schema" else None
    return fault
