"""The SDK client of one configured model, made once per run and shared by every call to that
model (the panel's readings and the synthesis): its endpoint, key, in-flight bound, request
rate (per process, and with ``limits: global`` also Prefect's global limits across
processes: tasks/models/limits.py) and request counter; and the one construction path of the
providers' SDK clients."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any

import anthropic
import httpx2
import openai
from aiolimiter import AsyncLimiter

from tasks.core.config import Gateway, ModelConfig, Provider
from tasks.core.redact import describe
from tasks.models.limits import SharedSlots, global_rate

__all__ = [
    "API_ERRORS",
    "SIMULATOR_MODEL_PREFIX",
    "Call",
    "ModelClient",
    "endpoint_url",
    "is_simulated",
    "sdk_client",
]

logger = logging.getLogger(__name__)

SIMULATOR_MODEL_PREFIX = "radflow-simulator/"  # how the simulator names its answers' model
DEFAULT_URLS = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com",
}
API_ERRORS: tuple[type[Exception], ...] = (openai.APIError, anthropic.APIError)

SdkClient = openai.AsyncOpenAI | anthropic.AsyncAnthropic | openai.OpenAI | anthropic.Anthropic

# The call being made in the current task: its HTTP requests are counted (SDK retries included).
_current: ContextVar[Call | None] = ContextVar("radflow_model_call", default=None)


def endpoint_url(cfg: ModelConfig, gateway: Gateway | None) -> str:
    """The base URL ``cfg`` is called at: its own, the gateway's, else the provider's."""
    return (cfg.endpoint(gateway)[0] or DEFAULT_URLS[cfg.provider]).rstrip("/")


def is_simulated(response_model: str | None) -> bool:
    """Whether an answer came from radflow's simulator (a test double), by its model name."""
    return (response_model or "").startswith(SIMULATOR_MODEL_PREFIX)


def sdk_client(
    cfg: ModelConfig,
    gateway: Gateway | None,
    *,
    sync: bool = False,
    on_request: Callable[[httpx2.Request], Any] | None = None,
) -> SdkClient:
    """The provider's SDK client for ``cfg`` (async unless ``sync``), with the arguments of
    :meth:`ModelConfig.client_options` (which registers the key and header values with the
    redactor first); ``on_request`` is called before each HTTP request, retries included."""
    options = cfg.client_options(gateway)
    sdk = openai if cfg.provider is Provider.OPENAI else anthropic
    if on_request is not None:
        hooks = {"request": [on_request]}
        factory = sdk.DefaultHttpxClient if sync else sdk.DefaultAsyncHttpxClient
        options["http_client"] = factory(event_hooks=hooks)
    if cfg.provider is Provider.OPENAI:
        return (openai.OpenAI if sync else openai.AsyncOpenAI)(**options)
    return (anthropic.Anthropic if sync else anthropic.AsyncAnthropic)(**options)


def _rate_limiter(requests_per_minute: float | None) -> AsyncLimiter | None:
    """A leaky bucket holding at most one second of requests, so no minute exceeds the rate
    by more than that second's burst."""
    if not requests_per_minute:
        return None
    burst = max(1.0, requests_per_minute / 60)
    return AsyncLimiter(burst, burst * 60 / requests_per_minute)


class Call:
    """One logical call to a model (a reading with its re-ask, or an impression), as an async
    context manager: it waits for one of the model's ``max_concurrency`` slots and holds it
    throughout (SDK retries and their back-off included), counts the HTTP requests made
    inside it, and times it from when the slot was taken. With ``shared`` (the model's slot
    of a Prefect global concurrency limit), that slot is held too, taken after this
    process's."""

    def __init__(
        self, limit: asyncio.Semaphore, shared: AbstractAsyncContextManager[None] | None = None
    ) -> None:
        self._limit = limit
        self._shared = shared
        self._token: Token[Call | None] | None = None
        self.requests = 0
        self.started = time.perf_counter()

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1e3

    async def __aenter__(self) -> Call:
        await self._limit.acquire()
        if self._shared is not None:
            try:
                await self._shared.__aenter__()
            except BaseException:
                self._limit.release()
                raise
        self._token = _current.set(self)
        self.started = time.perf_counter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
        try:
            if self._shared is not None:
                await self._shared.__aexit__(exc_type, exc, tb)
        finally:
            self._limit.release()


class ModelClient:
    """The async SDK client of one configured model, with its bounds.

    The bounds are asyncio primitives shared by every call of a flow run (one event loop):
    ``max_concurrency`` calls in flight (:meth:`call`) and ``requests_per_minute`` HTTP
    requests (each retry counts, through an httpx request hook). With ``global_limits``
    (``limits: global``) each call also holds a slot of the model's Prefect global
    concurrency limit and each request takes a slot of its rate limit, both strict.
    """

    def __init__(
        self, cfg: ModelConfig, gateway: Gateway | None, *, global_limits: bool = False
    ) -> None:
        self.cfg = cfg
        self.global_limits = global_limits
        self._shared = SharedSlots(cfg.name) if global_limits else None
        self.endpoint = endpoint_url(cfg, gateway)
        self.host = httpx2.URL(self.endpoint).host
        self._rate = _rate_limiter(cfg.requests_per_minute)
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self.sdk = sdk_client(cfg, gateway, on_request=self._on_request)

    async def _on_request(self, request: httpx2.Request) -> None:
        call = _current.get()
        if call is not None:
            call.requests += 1
        if self._rate is not None:
            await self._rate.acquire()
            if self.global_limits:
                await global_rate(self.cfg.name)

    def call(self) -> Call:
        """``async with client.call() as call:`` around the SDK calls of one logical call."""
        return Call(self._limit, self._shared.slot() if self._shared else None)

    def failure(self, what: str, exc: BaseException) -> str:
        """The recorded error of a failed call (``"<type>: <message>"``, redacted), logged."""
        error = describe(exc)
        logger.warning("%s by %s failed: %s", what, self.cfg.name, error)
        return error

    def meta(self) -> dict[str, str | None]:
        """How reports name the model: its label, provider, model id and endpoint host."""
        return dict(
            model=self.cfg.name,
            provider=self.cfg.provider.value,
            model_id=self.cfg.model,
            endpoint_host=self.host,
        )

    async def aclose(self) -> None:
        if self._shared is not None:
            await self._shared.aclose()
        await self.sdk.close()
