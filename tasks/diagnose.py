"""Ask every model of the panel to read a study, concurrently, over the providers' async SDKs
(OpenAI chat completions with a JSON-schema output; Anthropic messages with a forced tool)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from urllib.parse import urlparse

import anthropic
import openai
from pydantic import ValidationError

from tasks.config import Language, ModelConfig, Provider, Settings
from tasks.errors import RadflowError
from tasks.schema import ModelReading, Reading, Urgency

__all__ = ["Panel", "Prompt", "load_prompt", "user_text"]

logger = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
TOOL_NAME = "record_reading"
SIMULATOR_MODEL_PREFIX = "radflow-simulator/"
_DEFAULT_HOSTS = {Provider.OPENAI: "api.openai.com", Provider.ANTHROPIC: "api.anthropic.com"}


@dataclass(frozen=True)
class Prompt:
    text: str
    language: Language
    version: str  # "v1-<sha256 prefix>": changes whenever the prompt text does


@cache
def load_prompt(language: Language | str) -> Prompt:
    language = Language(language)
    name = f"reading.{PROMPT_VERSION}.{language.value}.md"
    text = resources.files("tasks").joinpath("prompts", name).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Prompt(text, language, f"{PROMPT_VERSION}-{digest}")


def user_text(context: dict[str, str], n_images: int, language: Language) -> str:
    """The user message: only the de-identified context and the image count."""
    items = "; ".join(f"{k}={v}" for k, v in sorted(context.items())) or "none"
    if language is Language.KO:
        return f"임상 정보: {items}. 영상 {n_images}장."
    return f"Clinical context: {items}. {n_images} image(s)."


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


class ModelClient:
    """One panel entry: an async SDK client and a bound on in-flight calls."""

    def __init__(self, cfg: ModelConfig, settings: Settings) -> None:
        self.cfg = cfg
        base_url, _, _ = cfg.endpoint(settings.gateway)
        self._key = cfg.api_key(settings.gateway).get_secret_value()
        self.host = urlparse(base_url).hostname if base_url else _DEFAULT_HOSTS[cfg.provider]
        common = dict(
            api_key=self._key,
            base_url=base_url,
            timeout=cfg.timeout_seconds,
            max_retries=cfg.max_retries,
            default_headers=cfg.extra_headers or None,
        )
        if cfg.provider is Provider.OPENAI:
            self.client: openai.AsyncOpenAI | anthropic.AsyncAnthropic = openai.AsyncOpenAI(
                **common
            )
        else:
            self.client = anthropic.AsyncAnthropic(**common)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)

    async def read(
        self, pngs: list[bytes], context: dict[str, str], prompt: Prompt
    ) -> ModelReading:
        """One call; every failure becomes a reading with ``ok=False`` and its error."""
        meta = dict(
            model=self.cfg.name,
            provider=self.cfg.provider.value,
            model_id=self.cfg.model,
            endpoint_host=self.host,
        )
        text = user_text(context, len(pngs), prompt.language)
        start = time.perf_counter()
        async with self._limit:
            try:
                if self.cfg.provider is Provider.OPENAI:
                    result = await self._openai(pngs, text, prompt)
                else:
                    result = await self._anthropic(pngs, text, prompt)
            except (openai.APIError, anthropic.APIError, ValidationError, RadflowError) as exc:
                error = _redact(f"{type(exc).__name__}: {exc}", self._key)
                logger.warning("model %s failed: %s", self.cfg.name, error)
                return ModelReading(
                    **meta, ok=False, error=error, latency_ms=(time.perf_counter() - start) * 1e3
                )
        reading, refusal, usage_in, usage_out, response_model = result
        latency = (time.perf_counter() - start) * 1e3
        cost = self.cfg.price.cost(usage_in, usage_out)
        simulated = (response_model or "").startswith(SIMULATOR_MODEL_PREFIX)
        base = dict(
            **meta,
            input_tokens=usage_in,
            output_tokens=usage_out,
            cost_usd=cost,
            latency_ms=latency,
            response_model=response_model,
            simulated=simulated,
        )
        if reading is None:
            return ModelReading(**base, ok=False, refusal=True, error=f"refused: {refusal}")
        return ModelReading(
            **base,
            ok=True,
            abnormal=reading.abnormal,
            urgency=Urgency(reading.urgency),
            findings=reading.findings,
            differentials=reading.differentials[:3],
            recommended_exams=reading.recommended_exams,
            rationale=reading.rationale,
        )

    async def _openai(self, pngs: list[bytes], text: str, prompt: Prompt):
        content: list[dict] = [{"type": "text", "text": text}]
        for png in pngs:
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            content.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
        completion = await self.client.chat.completions.parse(
            model=self.cfg.model,
            messages=[
                {"role": "system", "content": prompt.text},
                {"role": "user", "content": content},
            ],
            response_format=Reading,
            max_completion_tokens=self.cfg.max_output_tokens,
        )
        message = completion.choices[0].message
        if message.parsed is None and not message.refusal:
            raise RadflowError(f"empty answer (finish: {completion.choices[0].finish_reason})")
        usage = completion.usage
        tokens_in = usage.prompt_tokens if usage else 0
        tokens_out = usage.completion_tokens if usage else 0
        return message.parsed, message.refusal, tokens_in, tokens_out, completion.model

    async def _anthropic(self, pngs: list[bytes], text: str, prompt: Prompt):
        content: list[dict] = [
            {
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": "image/png",
                    "data": base64.b64encode(png).decode(),
                },
            }
            for png in pngs
        ]
        content.append({"type": "text", "text": text})
        message = await self.client.messages.create(
            model=self.cfg.model,
            max_tokens=self.cfg.max_output_tokens,
            system=prompt.text,
            messages=[{"role": "user", "content": content}],
            tools=[
                {
                    "name": TOOL_NAME,
                    "description": "Record the structured reading of the study.",
                    "input_schema": Reading.model_json_schema(),
                }
            ],
            tool_choice={"type": "tool", "name": TOOL_NAME},
        )
        usage = message.usage
        if message.stop_reason == "refusal":
            refusal = " ".join(b.text for b in message.content if b.type == "text") or "refusal"
            return None, refusal, usage.input_tokens, usage.output_tokens, message.model
        blocks = [b for b in message.content if b.type == "tool_use" and b.name == TOOL_NAME]
        if not blocks:
            raise RadflowError(f"answer has no {TOOL_NAME} tool call (stop: {message.stop_reason})")
        reading = Reading.model_validate(blocks[0].input)
        return reading, None, usage.input_tokens, usage.output_tokens, message.model


class Panel:
    """Every model of the config; ``read`` asks them all about one study at once."""

    def __init__(self, settings: Settings) -> None:
        self.clients = [ModelClient(cfg, settings) for cfg in settings.models]

    async def read(
        self, pngs: list[bytes], context: dict[str, str], prompt: Prompt
    ) -> list[ModelReading]:
        return list(await asyncio.gather(*(c.read(pngs, context, prompt) for c in self.clients)))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.client.close() for c in self.clients))
