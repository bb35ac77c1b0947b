"""What a provider's answer to a reading request means — a reading, a refusal (structured or
in plain text), an answer cut at ``max_output_tokens``, or an invalid one, with its token usage
when the answer carried any — and what an API error means: a key or model id the provider
rejects (the run stops), an image it rejects, or a gateway without ``json_schema``."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tasks.core.config import Gateway, ModelConfig
from tasks.core.errors import ProviderRejected
from tasks.core.redact import redact
from tasks.core.schema import Reading

__all__ = [
    "JSON_MODE_FORMAT",
    "Answer",
    "cut_error",
    "from_anthropic",
    "from_openai",
    "json_mode_prompt",
    "plain_refusal",
    "refused_error",
    "refuses_json_schema",
    "rejected",
    "rejected_image",
]

logger = logging.getLogger(__name__)

REFUSAL_MAX_CHARS = 300
_MAX_ERROR_CHARS = 800
JSON_MODE_FORMAT = {"type": "json_object"}
_SCHEMA_TEXT = json.dumps(Reading.model_json_schema(), separators=(",", ":"))
# Declining to read, as models word it (English and Korean): checked only on an answer that
# is not a valid reading, so a reading that quotes such a phrase is still a reading.
_REFUSAL = re.compile(
    r"\b(i\s*['’]?\s*m\s+sorry|i\s+am\s+sorry|i\s*can\s*['’]?\s*n?o?t\b|i\s+cannot|"
    r"i\s*['’]?\s*m\s+(?:unable|not\s+able)|i\s+am\s+(?:unable|not\s+able)|"
    r"unable\s+to\s+(?:provide|help|assist|interpret|diagnose)|as\s+an\s+ai|"
    r"(?:not|no)\s+(?:a\s+substitute\s+for\s+)?(?:professional\s+)?medical\s+advice|"
    r"consult\s+(?:a|your)\s+(?:qualified\s+)?(?:doctor|physician|radiologist|healthcare))",
    re.IGNORECASE,
)
_REFUSAL_KO = ("죄송", "드릴 수 없", "할 수 없습니다", "진단을 제공", "전문의와 상담")


@dataclass
class Answer:
    """One API answer: a valid reading, a refusal, a cut answer, or why it is invalid;
    ``input_tokens``/``output_tokens`` are None when the answer carried no usage."""

    reading: Reading | None = None
    refusal: str | None = None
    invalid: str | None = None
    cut: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    response_model: str | None = None


def plain_refusal(text: str) -> str | None:
    """``text`` when it is a refusal in prose ("I can't provide a diagnosis…") rather than a
    reading: not JSON, and worded as declining."""
    stripped = text.strip()
    if not stripped or stripped[0] in "{[`":
        return None
    if _REFUSAL.search(stripped) or any(p in stripped for p in _REFUSAL_KO):
        return stripped
    return None


def refused_error(refusal: str) -> str:
    """The recorded error of a refusal: its text, truncated and redacted."""
    text = " ".join(refusal.split())
    if len(text) > REFUSAL_MAX_CHARS:
        text = text[: REFUSAL_MAX_CHARS - 1] + "…"
    return redact(f"refused: {text}")


def cut_error(max_output_tokens: int) -> str:
    return f"output cut at max_output_tokens={max_output_tokens}: raise models[].max_output_tokens"


def json_mode_prompt(system: str) -> str:
    """The system prompt of a JSON-mode request: the schema goes in the prompt."""
    return (
        f"{system}\n\nAnswer with one JSON object only, matching this JSON schema: {_SCHEMA_TEXT}"
    )


def _validation_text(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts)[:_MAX_ERROR_CHARS]


def _usage(usage: Any, names: tuple[str, str]) -> tuple[int | None, int | None]:
    if usage is None:
        return None, None
    values = (getattr(usage, names[0], None), getattr(usage, names[1], None))
    return (None, None) if None in values else values  # type: ignore[return-value]


def from_openai(completion: Any) -> Answer:
    """The answer of a chat completion (json_schema or JSON mode)."""
    tokens = _usage(getattr(completion, "usage", None), ("prompt_tokens", "completion_tokens"))
    base = dict(input_tokens=tokens[0], output_tokens=tokens[1], response_model=completion.model)
    choice = completion.choices[0]
    message = choice.message
    if message.refusal:
        return Answer(refusal=message.refusal, **base)
    if choice.finish_reason == "length":
        return Answer(cut=True, **base)
    if not message.content:
        return Answer(invalid=f"empty answer (finish: {choice.finish_reason})", **base)
    try:
        return Answer(reading=Reading.model_validate_json(message.content), **base)
    except ValidationError as exc:
        if refusal := plain_refusal(message.content):
            return Answer(refusal=refusal, **base)
        return Answer(invalid=_validation_text(exc), **base)


def from_anthropic(message: Any, tool_name: str) -> Answer:
    """The answer of a message with the reading tool forced."""
    tokens = _usage(getattr(message, "usage", None), ("input_tokens", "output_tokens"))
    base = dict(input_tokens=tokens[0], output_tokens=tokens[1], response_model=message.model)
    text = " ".join(b.text for b in message.content if b.type == "text")
    if message.stop_reason == "refusal":
        return Answer(refusal=text or "refusal", **base)
    if message.stop_reason == "max_tokens":
        return Answer(cut=True, **base)
    blocks = [b for b in message.content if b.type == "tool_use" and b.name == tool_name]
    if not blocks:
        if refusal := plain_refusal(text):
            return Answer(refusal=refusal, **base)
        invalid = f"answer has no {tool_name} tool call (stop: {message.stop_reason})"
        return Answer(invalid=invalid, **base)
    try:
        return Answer(reading=Reading.model_validate(blocks[0].input), **base)
    except ValidationError as exc:
        return Answer(invalid=_validation_text(exc), **base)


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _said(exc: BaseException) -> str:
    """What the provider said: the ``error.message`` of its JSON body, else the exception's
    text; redacted, at most 200 characters."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = " ".join(str(message or exc).split())
    return redact(text if len(text) <= 200 else text[:199] + "…")


def rejected(
    exc: BaseException, cfg: ModelConfig, gateway: Gateway | None
) -> ProviderRejected | None:
    """The run-stopping error for a 401/403 (the key) or a 404 (the model id), in one line
    naming the model and the key's env var (or Secret block) or the model id; else None."""
    status = _status(exc)
    if status not in (401, 403, 404):
        return None
    base_url, key_env, key_block = cfg.endpoint(gateway)
    where = f"at {base_url}" if base_url else f"at the {cfg.provider.value} API"
    said = f"{type(exc).__name__}: {_said(exc)}"
    if status == 404:
        return ProviderRejected(
            f'model "{cfg.name}": the provider {where} does not know model id "{cfg.model}" '
            f"(404, {said})",
            hint="set models[].model to an id the provider serves (or fix base_url: the API "
            "root, e.g. .../v1 for OpenAI); a rerun reads the studies not reported",
        )
    key = f"env var {key_env}" if key_env else f'Prefect Secret block "{key_block}"'
    what = "rejected the API key" if status == 401 else "refused the API key for this model"
    return ProviderRejected(
        f'model "{cfg.name}" ({cfg.model}): the provider {where} {what} from {key} '
        f"({status}, {said})",
        hint=f"put a valid key in {key} and run again; the studies not reported are read then",
    )


def rejected_image(exc: BaseException) -> str | None:
    """The recorded error of a 400/413 about the image (too large, bad media type)."""
    if _status(exc) in (400, 413) and "image" in str(exc).lower():
        return f"image rejected by the provider (not retried): {_said(exc)}"
    return None


def refuses_json_schema(exc: BaseException) -> bool:
    """Whether a 400 says the endpoint does not support ``response_format`` json_schema."""
    text = str(exc).lower()
    return _status(exc) == 400 and ("json_schema" in text or "response_format" in text)
