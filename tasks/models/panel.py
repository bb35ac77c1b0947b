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
from collections.abc import Mapping

import openai

from tasks.core.config import Language, ModelConfig, Provider, Settings, StructuredOutput
from tasks.core.errors import ConfigError, ProviderRejected
from tasks.core.redact import redact
from tasks.core.schema import ModelReading, Reading, Urgency
from tasks.imaging.sizing import estimate_input_tokens, image_tokens, png_size
from tasks.models.answers import (
    JSON_MODE_FORMAT,
    Answer,
    cut_error,
    from_anthropic,
    from_openai,
    json_mode_prompt,
    refused_error,
    refuses_json_schema,
    rejected,
    rejected_image,
)
from tasks.models.cache import ReadingCache, reading_key
from tasks.models.client import API_ERRORS, ModelClient, is_simulated
from tasks.models.prompts import Prompt, load_prompt

# Prompt and load_prompt are the panel's too: ``Panel.read`` takes the reading prompt
__all__ = [
    "Panel",
    "Prompt",
    "Reader",
    "Stop",
    "load_prompt",
    "reask_text",
    "request_key",
    "user_text",
]

logger = logging.getLogger(__name__)

TOOL_NAME = "record_reading"
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


class Stop:
    """Shared by a run's readers: the first :class:`ProviderRejected` (a key or model id the
    provider refuses), after which no reader calls any model."""

    def __init__(self) -> None:
        self.error: ProviderRejected | None = None

    def check(self) -> None:
        if self.error is not None:
            raise self.error


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


def request_key(
    cfg: ModelConfig, endpoint: str, pngs: list[bytes], text: str, prompt: Prompt
) -> str:
    """The reading cache's key of a reading request to ``cfg`` at ``endpoint`` (the run's
    readers, and ``radflow screen --estimate`` to leave out what the cache would answer)."""
    return reading_key(
        [hashlib.sha256(p).hexdigest() for p in pngs],
        prompt.version,
        text,
        cfg.provider.value,
        cfg.model,
        endpoint,
        {"max_output_tokens": cfg.max_output_tokens, "schema": _SCHEMA_DIGEST, "detail": "high"},
    )


class Reader:
    """One panel entry: its model's client, the reading cache, and the entry asked instead
    when the model fails (``fallback``, with a client of its own)."""

    def __init__(
        self,
        cfg: ModelConfig,
        settings: Settings,
        cache: ReadingCache | None = None,
        stop: Stop | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.gateway = settings.gateway
        self.stop = stop or Stop()
        shared = settings.limits == "global"
        self.client = ModelClient(cfg, settings.gateway, global_limits=shared)
        # JSON mode from the start, or (auto) once the endpoint refused json_schema
        self.json_mode = cfg.structured_output is StructuredOutput.JSON_MODE
        self.fallback = Reader(cfg.fallback, settings, cache, self.stop) if cfg.fallback else None

    def cache_key(self, pngs: list[bytes], text: str, prompt: Prompt) -> str:
        return request_key(self.cfg, self.client.endpoint, pngs, text, prompt)

    async def read(
        self,
        images: list[bytes] | Mapping[str, list[bytes]],
        context: dict[str, str],
        prompt: Prompt,
    ) -> ModelReading:
        """Cache, else the model (one re-ask if invalid), else the fallback; never raises for
        a provider failure: that becomes a reading with ``ok=False`` and its error. ``images``
        is one list, or per provider the images sized for it (the fallback picks its own).
        Raises :class:`ProviderRejected` when the provider rejects the key or model id."""
        self.stop.check()
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
                "cost_usd": None
                if reading.cost_usd is None or backup.cost_usd is None
                else reading.cost_usd + backup.cost_usd,
                "cost_known": reading.cost_known and backup.cost_known,
            }
        )
        if self.cache and key and served.ok and not served.cached:
            # this panel entry's answer for this content: a rerun does not ask again
            await asyncio.to_thread(self.cache.put, key, served)
            served = served.model_copy(update={"cache_key": key})
        return served

    async def _call(self, pngs: list[bytes], text: str, prompt: Prompt) -> ModelReading:
        meta = self.client.meta()
        call = self.client.call()
        answers: list[Answer] = []
        try:
            async with call:
                answers.append(await self._ask(pngs, text, prompt, None))
                if answers[0].invalid is not None:
                    logger.warning("model %s: invalid answer, re-asking once", self.cfg.name)
                    answers.append(await self._ask(pngs, text, prompt, answers[0].invalid))
        except API_ERRORS as exc:
            if (fatal := rejected(exc, self.cfg, self.gateway)) is not None:
                if self.stop.error is None:
                    logger.error("%s", fatal)
                    self.stop.error = fatal
                raise self.stop.error from None
            image = rejected_image(exc)
            if image:
                logger.warning("reading by %s failed: %s", self.cfg.name, image)
            error = image or self.client.failure("reading", exc)
            return ModelReading(
                **meta, ok=False, error=error, **self._usage(answers),
                latency_ms=call.latency_ms, requests=call.requests, reasked=len(answers) > 1,
            )  # fmt: skip
        answer = answers[-1]
        base = dict(
            **meta,
            **self._usage(answers),
            latency_ms=call.latency_ms,
            response_model=answer.response_model,
            simulated=is_simulated(answer.response_model),
            requests=call.requests,
            reasked=len(answers) > 1,
        )
        if answer.cut:
            error = cut_error(self.cfg.max_output_tokens)
            logger.warning("reading by %s: %s", self.cfg.name, error)
            return ModelReading(**base, ok=False, cut=True, error=error)
        if answer.invalid is not None:
            error = redact(f"InvalidAnswer: {answer.invalid}")
            return ModelReading(**base, ok=False, error=error)
        if answer.reading is None:
            return ModelReading(
                **base, ok=False, refusal=True, error=refused_error(answer.refusal or "")
            )
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

    def _usage(self, answers: list[Answer]) -> dict:
        """Tokens and cost of ``answers``; the cost is None (unknown, not zero) when any of
        them carried no usage."""
        known = all(a.input_tokens is not None for a in answers)
        tokens_in = sum(a.input_tokens or 0 for a in answers)
        tokens_out = sum(a.output_tokens or 0 for a in answers)
        return dict(
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=self.cfg.price.cost(tokens_in, tokens_out) if known else None,
            cost_known=known,
        )

    async def _ask(self, pngs: list[bytes], text: str, prompt: Prompt, reask: str | None) -> Answer:
        texts = [text] + ([reask_text(reask, prompt.language)] if reask else [])
        if self.cfg.provider is Provider.OPENAI:
            return await self._openai(pngs, texts, prompt)
        return await self._anthropic(pngs, texts, prompt)

    async def _openai(self, pngs: list[bytes], texts: list[str], prompt: Prompt) -> Answer:
        content: list[dict] = [{"type": "text", "text": t} for t in texts]
        for png in pngs:
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            content.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})

        async def create(json_mode: bool) -> Answer:
            system = json_mode_prompt(prompt.text) if json_mode else prompt.text
            completion = await self.client.sdk.chat.completions.create(
                model=self.cfg.model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": content},
                ],
                response_format=JSON_MODE_FORMAT if json_mode else _OPENAI_FORMAT,
                max_completion_tokens=self.cfg.max_output_tokens,
            )
            return from_openai(completion)

        if self.json_mode:
            return await create(True)
        try:
            return await create(False)
        except openai.BadRequestError as exc:
            auto = self.cfg.structured_output is StructuredOutput.AUTO
            if not (auto and refuses_json_schema(exc)):
                raise
            if not self.json_mode:
                logger.warning(
                    "model %s: the endpoint refuses response_format json_schema; JSON mode "
                    "(json_object, validated here) for the rest of the run",
                    self.cfg.name,
                )
                self.json_mode = True
            return await create(True)

    async def _anthropic(self, pngs: list[bytes], texts: list[str], prompt: Prompt) -> Answer:
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
        message = await self.client.sdk.messages.create(
            model=self.cfg.model,
            max_tokens=self.cfg.max_output_tokens,
            system=prompt.text,
            messages=[{"role": "user", "content": content}],
            tools=[_ANTHROPIC_TOOL],
            tool_choice={"type": "tool", "name": TOOL_NAME},
        )
        return from_anthropic(message, TOOL_NAME)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.fallback:
            await self.fallback.aclose()


class Panel:
    """Every model of the config; ``read`` asks them all about one study at once. Made once
    per run: its model clients (``client``) serve every call of the run, the synthesis too."""

    def __init__(self, settings: Settings, cache: ReadingCache | None = None) -> None:
        self.stop = Stop()  # the first rejected key or model id stops every reader
        self.readers = [Reader(cfg, settings, cache, self.stop) for cfg in settings.models]

    async def read(
        self,
        pngs: list[bytes] | Mapping[str, list[bytes]],
        context: dict[str, str],
        prompt: Prompt,
    ) -> list[ModelReading]:
        """Ask every model at once. ``pngs`` is one list for all, or per provider the images
        sized so that provider does not rescale them (``PreparedImage.for_provider``); each
        reading carries the input tokens estimated by the provider's published formula.
        Raises :class:`ProviderRejected` once a provider rejected a key or model id."""
        self.stop.check()

        async def one(reader: Reader) -> ModelReading:
            provider = reader.cfg.provider.value
            images = pngs if isinstance(pngs, list) else pngs[provider]
            reading = await reader.read(pngs, context, prompt)
            text = prompt.text + user_text(context, len(images), prompt.language)
            estimate = estimate_input_tokens(provider, images, text)
            pixels = image_tokens(provider, (png_size(p) for p in images))
            return reading.model_copy(
                update={"estimated_input_tokens": estimate, "estimated_image_tokens": pixels}
            )

        return list(await asyncio.gather(*(one(r) for r in self.readers)))

    def client(self, name: str) -> ModelClient:
        """The client of the panel model named ``name`` (its bounds are the readings')."""
        for reader in self.readers:
            if reader.cfg.name == name:
                return reader.client
        known = ", ".join(r.cfg.name for r in self.readers)
        raise ConfigError(f'"{name}" is not a panel model (known: {known})')

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers of the panel's models and of their fallbacks."""
        out: set[str] = set()
        for reader in self.readers:
            entry: Reader | None = reader
            while entry is not None:
                out.add(entry.cfg.provider.value)
                entry = entry.fallback
        return tuple(sorted(out))

    async def aclose(self) -> None:
        await asyncio.gather(*(r.aclose() for r in self.readers))
