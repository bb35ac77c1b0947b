"""Optional synthesis: one panel model writes the narrative impression from the structured
readings only (no image, no clinical context), in the report language. It never changes the
structured consensus; report.json and report.md mark the text as model-written."""

from __future__ import annotations

import json
import logging

from tasks.core.config import Language, Provider, SynthesisConfig
from tasks.core.schema import Consensus, Impression, ModelReading
from tasks.models.client import API_ERRORS, ModelClient, is_simulated
from tasks.models.prompts import PromptKind, load_prompt

__all__ = ["synthesis_input", "synthesize"]

logger = logging.getLogger(__name__)


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


def _tokens(usage: object, names: tuple[str, str]) -> tuple[int, int] | None:
    """(input, output) tokens, or None when the answer carried no usage."""
    values = tuple(getattr(usage, n, None) for n in names) if usage is not None else (None,)
    return None if None in values else values  # type: ignore[return-value]


async def _ask(
    client: ModelClient, system: str, text: str, max_tokens: int
) -> tuple[str, tuple[int, int] | None, str | None]:
    cfg = client.cfg
    if cfg.provider is Provider.OPENAI:
        completion = await client.sdk.chat.completions.create(
            model=cfg.model,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": text},
            ],
            max_completion_tokens=max_tokens,
        )
        return (
            (completion.choices[0].message.content or "").strip(),
            _tokens(getattr(completion, "usage", None), ("prompt_tokens", "completion_tokens")),
            completion.model,
        )
    message = await client.sdk.messages.create(
        model=cfg.model,
        max_tokens=max_tokens,
        system=system,
        messages=[{"role": "user", "content": text}],
    )
    answer = " ".join(b.text for b in message.content if b.type == "text").strip()
    usage = _tokens(getattr(message, "usage", None), ("input_tokens", "output_tokens"))
    return answer, usage, message.model


async def synthesize(
    client: ModelClient,
    synthesis: SynthesisConfig,
    language: Language | str,
    consensus: Consensus,
    readings: list[ModelReading],
) -> Impression:
    """Ask the model of ``client`` (the panel's client of ``synthesis.model``: the call holds
    one of its in-flight slots, obeys its request rate and counts its requests, like a
    reading) for the impression in ``language``; a failure is an Impression with ``ok=False``
    and its error (the structured report stands without it)."""
    prompt = load_prompt(language, PromptKind.IMPRESSION)
    meta = dict(**client.meta(), language=prompt.language.value, prompt_version=prompt.version)
    call = client.call()
    text = synthesis_input(consensus, readings)
    try:
        async with call:
            answer, usage, response_model = await _ask(
                client, prompt.text, text, synthesis.max_output_tokens
            )
    except API_ERRORS as exc:
        return Impression(
            **meta,
            ok=False,
            error=client.failure("synthesis", exc),
            latency_ms=call.latency_ms,
            requests=call.requests,
        )
    tokens_in, tokens_out = usage or (0, 0)
    return Impression(
        **meta,
        ok=bool(answer),
        text=answer,
        error=None if answer else "empty answer",
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=client.cfg.price.cost(tokens_in, tokens_out) if usage else None,
        cost_known=usage is not None,
        latency_ms=call.latency_ms,
        response_model=response_model,
        simulated=is_simulated(response_model),
        requests=call.requests,
    )
