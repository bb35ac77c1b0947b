"""Optional synthesis: one panel model writes the narrative impression from the structured
readings only (no image, no clinical context), in the report language. It never changes the
structured consensus; report.json and report.md mark the text as model-written."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import cache
from importlib import resources
from urllib.parse import urlparse

import anthropic
import openai

from tasks.core.config import Language, ModelConfig, Provider, Settings, SynthesisConfig
from tasks.core.redact import describe
from tasks.core.schema import Consensus, Impression, ModelReading

__all__ = ["impression_prompt", "synthesis_input", "synthesize"]

logger = logging.getLogger(__name__)

PROMPT_VERSION = "impression-v1"
SIMULATOR_MODEL_PREFIX = "radflow-simulator/"
_DEFAULT_HOSTS = {Provider.OPENAI: "api.openai.com", Provider.ANTHROPIC: "api.anthropic.com"}


@cache
def impression_prompt(language: Language | str) -> tuple[str, str]:
    """(system prompt, version "impression-v1-<sha256 prefix>") for ``language``."""
    language = Language(language)
    name = f"impression.v1.{language.value}.md"
    text = resources.files("tasks.models").joinpath("prompts", name).read_text(encoding="utf-8")
    return text, f"{PROMPT_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def synthesis_input(consensus: Consensus, readings: list[ModelReading]) -> str:
    """The user message: the consensus and each model's structured reading as JSON. No
    image, no clinical context, no identifier, no free-text rationale."""
    payload = {
        "consensus": consensus.model_dump(
            mode="json",
            include={
                "abnormal",
                "urgency",
                "score",
                "agreement",
                "needs_review",
                "findings",
                "differentials",
                "recommended_exams",
            },
        ),
        "readings": [
            r.model_dump(
                mode="json",
                include={
                    "model",
                    "ok",
                    "abnormal",
                    "urgency",
                    "findings",
                    "differentials",
                    "recommended_exams",
                },
            )
            for r in readings
        ],
    }
    return json.dumps(payload, ensure_ascii=False, indent=1)


async def _ask(
    cfg: ModelConfig, settings: Settings, system: str, text: str, max_tokens: int
) -> tuple[str, int, int, str | None]:
    common = cfg.client_options(settings.gateway)  # registers the key and header values
    if cfg.provider is Provider.OPENAI:
        async with openai.AsyncOpenAI(**common) as client:
            completion = await client.chat.completions.create(
                model=cfg.model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": text},
                ],
                max_completion_tokens=max_tokens,
            )
        usage = completion.usage
        return (
            (completion.choices[0].message.content or "").strip(),
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            completion.model,
        )
    async with anthropic.AsyncAnthropic(**common) as client:
        message = await client.messages.create(
            model=cfg.model,
            max_tokens=max_tokens,
            system=system,
            messages=[{"role": "user", "content": text}],
        )
    answer = " ".join(b.text for b in message.content if b.type == "text").strip()
    return answer, message.usage.input_tokens, message.usage.output_tokens, message.model


async def synthesize(
    synthesis: SynthesisConfig,
    settings: Settings,
    consensus: Consensus,
    readings: list[ModelReading],
) -> Impression:
    """Ask ``synthesis.model`` for the impression; a failure is an Impression with ``ok=False``
    and its error (the structured report stands without it)."""
    cfg = next(m for m in settings.models if m.name == synthesis.model)
    system, version = impression_prompt(settings.language)
    base_url, _, _ = cfg.endpoint(settings.gateway)
    meta = dict(
        model=cfg.name,
        provider=cfg.provider.value,
        model_id=cfg.model,
        endpoint_host=urlparse(base_url).hostname if base_url else _DEFAULT_HOSTS[cfg.provider],
        language=settings.language.value,
        prompt_version=version,
    )
    start = time.perf_counter()
    try:
        text, tokens_in, tokens_out, response_model = await _ask(
            cfg, settings, system, synthesis_input(consensus, readings), synthesis.max_output_tokens
        )
    except (openai.APIError, anthropic.APIError) as exc:
        logger.warning("synthesis by %s failed: %s", cfg.name, type(exc).__name__)
        return Impression(
            **meta,
            ok=False,
            error=describe(exc),
            latency_ms=(time.perf_counter() - start) * 1e3,
        )
    return Impression(
        **meta,
        ok=bool(text),
        text=text,
        error=None if text else "empty answer",
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=cfg.price.cost(tokens_in, tokens_out),
        latency_ms=(time.perf_counter() - start) * 1e3,
        response_model=response_model,
        simulated=(response_model or "").startswith(SIMULATOR_MODEL_PREFIX),
    )
