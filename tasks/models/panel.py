"""Ask every model of the panel to read a study, concurrently, over the providers' async SDKs
(OpenAI chat completions with a strict JSON-schema output; Anthropic messages with a forced
tool), within per-model limits, with one re-ask on an invalid answer, an optional fallback
model and a content-addressed reading cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from importlib import resources

import anthropic
import httpx2
import openai
from aiolimiter import AsyncLimiter
from pydantic import ValidationError

from tasks.core.config import Language, ModelConfig, Provider, Settings
from tasks.core.redact import describe, redact
from tasks.core.schema import ModelReading, Reading, Urgency
from tasks.imaging.sizing import estimate_input_tokens
from tasks.models.cache import ReadingCache, reading_key

__all__ = ["ModelClient", "Panel", "Prompt", "load_prompt", "reask_text", "user_text"]

logger = logging.getLogger(__name__)

PROMPT_VERSION = "v1"
TOOL_NAME = "record_reading"
SIMULATOR_MODEL_PREFIX = "radflow-simulator/"
_DEFAULT_URLS = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com",
}
_SCHEMA = Reading.model_json_schema()
_SCHEMA_DIGEST = hashlib.sha256(json.dumps(_SCHEMA, sort_keys=True).encode()).hexdigest()[:16]
_OPENAI_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "reading", "schema": _SCHEMA, "strict": True},
}
_ANTHROPIC_TOOL = {
    "name": TOOL_NAME,
    "description": "Record the structured reading of the study.",
    "input_schema": _SCHEMA,
}
_MAX_ERROR_CHARS = 800

# HTTP requests made by the reading being asked in the current task (SDK retries included).
_requests: ContextVar[list[int] | None] = ContextVar("radflow_model_requests", default=None)


@dataclass(frozen=True)
class Prompt:
    text: str
    language: Language
    version: str  # "v1-<sha256 prefix>": changes whenever the prompt text does


@dataclass
class _Answer:
    """One API answer: a valid reading, a refusal, or the reason it is invalid."""

    reading: Reading | None
    refusal: str | None
    invalid: str | None
    input_tokens: int
    output_tokens: int
    response_model: str | None


@cache
def load_prompt(language: Language | str) -> Prompt:
    language = Language(language)
    name = f"reading.{PROMPT_VERSION}.{language.value}.md"
    text = resources.files("tasks.models").joinpath("prompts", name).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Prompt(text, language, f"{PROMPT_VERSION}-{digest}")


def user_text(context: dict[str, str], n_images: int, language: Language) -> str:
    """The user message: only the de-identified context and the image count."""
    items = "; ".join(f"{k}={v}" for k, v in sorted(context.items())) or "none"
    if language is Language.KO:
        return f"임상 정보: {items}. 영상 {n_images}장."
    return f"Clinical context: {items}. {n_images} image(s)."


def reask_text(error: str, language: Language) -> str:
    """The note added to the one re-ask after a schema-invalid answer."""
    if language is Language.KO:
        return f"이전 답변이 형식 검증에 실패했습니다: {error}. 정해진 스키마로만 다시 답하세요."
    return f"Your previous answer failed validation: {error}. Answer again using only the schema."


def _validation_text(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts)[:_MAX_ERROR_CHARS]


def _rate_limiter(requests_per_minute: float | None) -> AsyncLimiter | None:
    """A leaky bucket holding at most one second of requests, so no minute exceeds the rate
    by more than that second's burst."""
    if not requests_per_minute:
        return None
    burst = max(1.0, requests_per_minute / 60)
    return AsyncLimiter(burst, burst * 60 / requests_per_minute)


class ModelClient:
    """One panel entry: an async SDK client, its in-flight bound and request rate, its fallback.

    The bounds are asyncio primitives shared by every study of a flow run (one event loop):
    ``max_concurrency`` readings in flight (SDK retries and their back-off included) and
    ``requests_per_minute`` HTTP requests (each retry counts, through an httpx request hook).
    """

    def __init__(
        self, cfg: ModelConfig, settings: Settings, cache: ReadingCache | None = None
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        options = cfg.client_options(settings.gateway)  # registers the key and header values
        self.endpoint = (options["base_url"] or _DEFAULT_URLS[cfg.provider]).rstrip("/")
        self.host = httpx2.URL(self.endpoint).host
        self._rate = _rate_limiter(cfg.requests_per_minute)
        sdk = openai if cfg.provider is Provider.OPENAI else anthropic
        http_client = sdk.DefaultAsyncHttpxClient(event_hooks={"request": [self._on_request]})
        self.client: openai.AsyncOpenAI | anthropic.AsyncAnthropic = (
            openai.AsyncOpenAI if cfg.provider is Provider.OPENAI else anthropic.AsyncAnthropic
        )(**options, http_client=http_client)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.fallback = ModelClient(cfg.fallback, settings, cache) if cfg.fallback else None

    async def _on_request(self, request: httpx2.Request) -> None:
        counter = _requests.get()
        if counter is not None:
            counter[0] += 1
        if self._rate is not None:
            await self._rate.acquire()

    def cache_key(self, pngs: list[bytes], text: str, prompt: Prompt) -> str:
        return reading_key(
            [hashlib.sha256(p).hexdigest() for p in pngs],
            prompt.version,
            text,
            self.cfg.provider.value,
            self.cfg.model,
            self.endpoint,
            {
                "max_output_tokens": self.cfg.max_output_tokens,
                "schema": _SCHEMA_DIGEST,
                "detail": "high",
            },
        )

    async def read(
        self,
        images: list[bytes] | Mapping[str, list[bytes]],
        context: dict[str, str],
        prompt: Prompt,
    ) -> ModelReading:
        """Cache, else the model (one re-ask if invalid), else the fallback; never raises for
        a provider failure: that becomes a reading with ``ok=False`` and its error. ``images``
        is one list, or per provider the images sized for it (the fallback picks its own)."""
        pngs = images if isinstance(images, list) else images[self.cfg.provider.value]
        text = user_text(context, len(pngs), prompt.language)
        key = self.cache_key(pngs, text, prompt) if self.cache else None
        if self.cache and key:
            hit = await asyncio.to_thread(self.cache.get, key)
            if hit is not None:
                return hit.model_copy(update={"model": self.cfg.name})
        reading = await self._call(pngs, text, prompt)
        if self.cache and key and reading.ok:
            await asyncio.to_thread(self.cache.put, key, reading)
            reading = reading.model_copy(update={"cache_key": key})
        if reading.ok or self.fallback is None:
            return reading
        logger.warning("model %s failed, asking fallback %s", self.cfg.name, self.fallback.cfg.name)
        backup = await self.fallback.read(images, context, prompt)
        served = backup.model_copy(
            update={
                "model": self.cfg.name,
                "fallback": self.fallback.cfg.name,
                "primary_error": reading.error,
                "requests": reading.requests + backup.requests,
                "reasked": reading.reasked or backup.reasked,
                "input_tokens": reading.input_tokens + backup.input_tokens,
                "output_tokens": reading.output_tokens + backup.output_tokens,
                "cost_usd": reading.cost_usd + backup.cost_usd,
            }
        )
        if self.cache and key and served.ok and not served.cached:
            # this panel entry's answer for this content: a rerun does not ask again
            await asyncio.to_thread(self.cache.put, key, served)
            served = served.model_copy(update={"cache_key": key})
        return served

    async def _call(self, pngs: list[bytes], text: str, prompt: Prompt) -> ModelReading:
        meta = dict(
            model=self.cfg.name,
            provider=self.cfg.provider.value,
            model_id=self.cfg.model,
            endpoint_host=self.host,
        )
        counter = [0]
        token = _requests.set(counter)
        tokens_in = tokens_out = 0
        reasked = False
        start = time.perf_counter()
        try:
            async with self._limit:
                start = time.perf_counter()
                answer = await self._ask(pngs, text, prompt, None)
                tokens_in, tokens_out = answer.input_tokens, answer.output_tokens
                if answer.invalid is not None:
                    logger.warning("model %s: invalid answer, re-asking once", self.cfg.name)
                    reasked = True
                    answer = await self._ask(pngs, text, prompt, answer.invalid)
                    tokens_in += answer.input_tokens
                    tokens_out += answer.output_tokens
        except (openai.APIError, anthropic.APIError) as exc:
            error = describe(exc)
            logger.warning("model %s failed: %s", self.cfg.name, error)
            return ModelReading(
                **meta,
                ok=False,
                error=error,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                cost_usd=self.cfg.price.cost(tokens_in, tokens_out),
                latency_ms=(time.perf_counter() - start) * 1e3,
                requests=counter[0],
                reasked=reasked,
            )
        finally:
            _requests.reset(token)
        response_model = answer.response_model
        base = dict(
            **meta,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=self.cfg.price.cost(tokens_in, tokens_out),
            latency_ms=(time.perf_counter() - start) * 1e3,
            response_model=response_model,
            simulated=(response_model or "").startswith(SIMULATOR_MODEL_PREFIX),
            requests=counter[0],
            reasked=reasked,
        )
        if answer.invalid is not None:
            error = redact(f"InvalidAnswer: {answer.invalid}")
            return ModelReading(**base, ok=False, error=error)
        if answer.reading is None:
            error = redact(f"refused: {answer.refusal}")
            return ModelReading(**base, ok=False, refusal=True, error=error)
        r = answer.reading
        return ModelReading(
            **base,
            ok=True,
            abnormal=r.abnormal,
            urgency=Urgency(r.urgency),
            findings=r.findings,
            differentials=r.differentials[:3],
            recommended_exams=r.recommended_exams,
            rationale=r.rationale,
        )

    async def _ask(
        self, pngs: list[bytes], text: str, prompt: Prompt, reask: str | None
    ) -> _Answer:
        texts = [text] + ([reask_text(reask, prompt.language)] if reask else [])
        if self.cfg.provider is Provider.OPENAI:
            return await self._openai(pngs, texts, prompt)
        return await self._anthropic(pngs, texts, prompt)

    async def _openai(self, pngs: list[bytes], texts: list[str], prompt: Prompt) -> _Answer:
        content: list[dict] = [{"type": "text", "text": t} for t in texts]
        for png in pngs:
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            content.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
        completion = await self.client.chat.completions.create(
            model=self.cfg.model,
            messages=[
                {"role": "system", "content": prompt.text},
                {"role": "user", "content": content},
            ],
            response_format=_OPENAI_FORMAT,
            max_completion_tokens=self.cfg.max_output_tokens,
        )
        usage = completion.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        choice = completion.choices[0]
        message = choice.message
        if message.refusal:
            return _Answer(None, message.refusal, None, *tokens, completion.model)
        if not message.content:
            invalid = f"empty answer (finish: {choice.finish_reason})"
            return _Answer(None, None, invalid, *tokens, completion.model)
        try:
            reading = Reading.model_validate_json(message.content)
        except ValidationError as exc:
            return _Answer(None, None, _validation_text(exc), *tokens, completion.model)
        return _Answer(reading, None, None, *tokens, completion.model)

    async def _anthropic(self, pngs: list[bytes], texts: list[str], prompt: Prompt) -> _Answer:
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
        content += [{"type": "text", "text": t} for t in texts]
        message = await self.client.messages.create(
            model=self.cfg.model,
            max_tokens=self.cfg.max_output_tokens,
            system=prompt.text,
            messages=[{"role": "user", "content": content}],
            tools=[_ANTHROPIC_TOOL],
            tool_choice={"type": "tool", "name": TOOL_NAME},
        )
        tokens = (message.usage.input_tokens, message.usage.output_tokens)
        if message.stop_reason == "refusal":
            refusal = " ".join(b.text for b in message.content if b.type == "text") or "refusal"
            return _Answer(None, refusal, None, *tokens, message.model)
        blocks = [b for b in message.content if b.type == "tool_use" and b.name == TOOL_NAME]
        if not blocks:
            invalid = f"answer has no {TOOL_NAME} tool call (stop: {message.stop_reason})"
            return _Answer(None, None, invalid, *tokens, message.model)
        try:
            reading = Reading.model_validate(blocks[0].input)
        except ValidationError as exc:
            return _Answer(None, None, _validation_text(exc), *tokens, message.model)
        return _Answer(reading, None, None, *tokens, message.model)

    async def aclose(self) -> None:
        await self.client.close()
        if self.fallback:
            await self.fallback.aclose()


class Panel:
    """Every model of the config; ``read`` asks them all about one study at once."""

    def __init__(self, settings: Settings, cache: ReadingCache | None = None) -> None:
        self.clients = [ModelClient(cfg, settings, cache) for cfg in settings.models]

    async def read(
        self,
        pngs: list[bytes] | Mapping[str, list[bytes]],
        context: dict[str, str],
        prompt: Prompt,
    ) -> list[ModelReading]:
        """Ask every model at once. ``pngs`` is one list for all, or per provider the images
        sized so that provider does not rescale them (``PreparedImage.for_provider``); each
        reading carries the input tokens estimated by the provider's published formula."""

        async def one(client: ModelClient) -> ModelReading:
            provider = client.cfg.provider.value
            images = pngs if isinstance(pngs, list) else pngs[provider]
            reading = await client.read(pngs, context, prompt)
            text = prompt.text + user_text(context, len(images), prompt.language)
            estimate = estimate_input_tokens(provider, images, text)
            return reading.model_copy(update={"estimated_input_tokens": estimate})

        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers of the panel's models and of their fallbacks."""
        out: set[str] = set()
        for client in self.clients:
            while client is not None:
                out.add(client.cfg.provider.value)
                client = client.fallback
        return tuple(sorted(out))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))
