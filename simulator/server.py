"""HTTP server of the simulator: POST /v1/chat/completions (OpenAI), POST /v1/messages
(Anthropic), GET /stats, and /leaky/{400|401|403}/... (a provider that rejects every request and
echoes its headers back). A TEST DOUBLE: every answer names ``radflow-simulator`` as its model
and says in its rationale that it is simulated."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from simulator.faults import CODES, REJECTIONS, Faults, applicable, parse_faults
from simulator.finetune import FinetuneState, finetune_routes
from simulator.vision import Profile, anthropic_image_tokens, judge, openai_image_tokens

__all__ = ["Faults", "SimState", "create_app", "parse_faults"]

logger = logging.getLogger(__name__)

MODEL_PREFIX = "radflow-simulator/"
LEAKY_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}

_TEXT = {
    "en": {
        "finding": "SIMULATED: focal bright lesion",
        "differential": ["SIMULATED: mass", "SIMULATED: nodule", "SIMULATED: artefact"],
        "exam": "SIMULATED: contrast-enhanced follow-up",
        "rationale": "radflow simulator (test double), not a medical opinion: bright-blob "
        "detector {seen}, answer drawn with sensitivity {sens:.2f} and specificity {spec:.2f}.",
        "seen": ("saw a lesion", "saw no lesion"),
        "refusal": "SIMULATED refusal: I can't help with that.",
        "text_refusal": "I'm sorry, but I can't provide a diagnosis or interpret medical "
        "images. Please consult a qualified radiologist. (SIMULATED refusal, radflow simulator)",
        "impression": "SIMULATED impression (radflow simulator, a test double; not a medical "
        "opinion): summary of the panel's {n} structured reading(s); see the findings above.",
    },
    "ko": {
        "finding": "시뮬레이션: 국소 고음영 병변",
        "differential": ["시뮬레이션: 종괴", "시뮬레이션: 결절", "시뮬레이션: 인공물"],
        "exam": "시뮬레이션: 조영 증강 추적 검사",
        "rationale": "radflow 시뮬레이터(테스트용 대역)의 답이며 의학적 소견이 아닙니다: 밝은 "
        "병변 검출기가 {seen}, 민감도 {sens:.2f}, 특이도 {spec:.2f}로 답을 정했습니다.",
        "seen": ("병변을 보았고", "병변을 보지 못했고"),
        "refusal": "시뮬레이션 거절: 도와드릴 수 없습니다.",
        "text_refusal": "죄송하지만 진단을 제공하거나 의료 영상을 판독해 드릴 수 없습니다. "
        "영상의학과 전문의와 상담하십시오. (시뮬레이션 거절, radflow 시뮬레이터)",
        "impression": "시뮬레이션 인상 (radflow 시뮬레이터, 테스트용 대역이며 의학적 소견이 "
        "아닙니다): 패널의 구조화 판독 {n}건 요약; 위의 소견을 참조하십시오.",
    },
}


@dataclass
class SimState:
    """Counters the tests read through GET /stats."""

    seed: int = 0
    latency: float = 0.0
    profiles: dict[str, Profile] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    requests: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    in_flight: Counter = field(default_factory=Counter)
    peak_in_flight: Counter = field(default_factory=Counter)
    bodies: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    record_bodies: bool = False
    header_names: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    connections: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def profile(self, model: str) -> Profile:
        return self.profiles.get(model, self.profiles.get("*", Profile()))


def _language(system_text: str) -> str:
    return "ko" if any("\uac00" <= ch <= "\ud7a3" for ch in system_text) else "en"


def _fill(schema: dict, values: dict) -> dict:
    """An instance of ``schema`` (an object schema) using ``values`` for the known fields."""
    out = {}
    for name, prop in schema.get("properties", {}).items():
        if name in values:
            out[name] = values[name]
        elif "enum" in prop:
            out[name] = prop["enum"][0]
        else:
            out[name] = {
                "string": "",
                "array": [],
                "boolean": False,
                "integer": 0,
                "number": 0.0,
                "object": {},
            }.get(prop.get("type"))
    return out


def _reading(pngs: list[bytes], model: str, lang: str, state: SimState) -> dict:
    profile = state.profile(model)
    v = judge(pngs, model, profile, state.seed)
    t = _TEXT[lang]
    return {
        "abnormal": v.abnormal,
        "findings": [t["finding"]] if v.abnormal else [],
        "differentials": t["differential"] if v.abnormal else [],
        "urgency": v.urgency,
        "recommended_exams": [t["exam"]] if v.abnormal else [],
        "rationale": t["rationale"].format(
            seen=t["seen"][0 if v.lesion else 1],
            sens=profile.sensitivity,
            spec=profile.specificity,
        ),
    }


async def _hang(request: Request, seconds: float) -> None:
    """An injected timeout: answer nothing until the client gives up (disconnects) or
    ``seconds`` pass, so a request the client abandoned no longer counts as in flight."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _impression(body: dict, lang: str) -> str:
    """Plain text for a request with no image and no output schema (radflow's synthesis):
    counts the readings (``"model":`` keys) the request carries."""
    return _TEXT[lang]["impression"].format(n=json.dumps(body).count('\\"model\\":'))


def _error(
    status: int, message: str, kind: str, headers: dict | None = None, code: str | None = None
) -> JSONResponse:
    """An error body both SDKs read: Anthropic's ``{"type": "error", "error": {...}}`` with
    OpenAI's ``code`` (e.g. ``model_not_found``) when there is one."""
    error = {"type": kind, "message": f"radflow simulator: {message}"}
    if code:
        error["code"] = code
    return JSONResponse({"type": "error", "error": error}, status_code=status, headers=headers)


def _authorised(request: Request) -> bool:
    bearer = request.headers.get("authorization", "")
    return bool(request.headers.get("x-api-key") or bearer.removeprefix("Bearer ").strip())


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def _text_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def create_app(state: SimState) -> Starlette:
    async def guarded(request: Request, protocol: str) -> JSONResponse:
        if not _authorised(request):
            return _error(401, "missing API key", "authentication_error")
        raw = await request.body()
        try:
            body = json.loads(raw)
            model = str(body["model"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with a model", "invalid_request_error")
        state.requests[model] += 1
        state.header_names[model].update(request.headers.keys())  # names only, never values
        if request.client:  # the client's address and port: one per TCP connection
            state.connections[model].add(f"{request.client.host}:{request.client.port}")
        if state.record_bodies:
            state.bodies[model].append(raw.decode("utf-8", "replace"))
        state.in_flight[model] += 1
        state.peak_in_flight[model] = max(state.peak_in_flight[model], state.in_flight[model])
        try:
            if state.latency:
                await asyncio.sleep(state.latency)
            fault = applicable(state.faults.draw(state.seed, model, raw), body, protocol)
            if fault:
                state.injected[fault] += 1
            if fault in REJECTIONS:
                status, kind, message = REJECTIONS[fault]
                return _error(status, message.format(model=model), kind, code=CODES.get(fault))
            if fault == "429":
                return _error(
                    429,
                    "rate limited (injected)",
                    "rate_limit_error",
                    {"retry-after": f"{state.faults.retry_after:g}"},
                )
            if fault == "500":
                return _error(500, "server error (injected)", "api_error")
            if fault == "529":
                return _error(529, "Overloaded (injected)", "overloaded_error")
            if fault == "timeout":
                await _hang(request, state.faults.timeout_sleep)
                return _error(504, "timed out (injected)", "timeout_error")
            handler = _openai if protocol == "openai" else _anthropic
            response = handler(body, model, state, fault)
            state.answered[model] += 1
            return response
        finally:
            state.in_flight[model] -= 1

    async def chat_completions(request: Request) -> JSONResponse:
        return await guarded(request, "openai")

    async def messages(request: Request) -> JSONResponse:
        return await guarded(request, "anthropic")

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "test_double": True,
                "requests": dict(state.requests),
                "answered": dict(state.answered),
                "injected": dict(state.injected),
                "in_flight": dict(state.in_flight),
                "peak_in_flight": dict(state.peak_in_flight),
                "header_names": {m: sorted(n) for m, n in state.header_names.items()},
                "connections": {m: len(c) for m, c in state.connections.items()},
            }
        )

    async def bodies(request: Request) -> JSONResponse:
        return JSONResponse(dict(state.bodies))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "test_double": True})

    async def leaky(request: Request) -> JSONResponse:
        """Any request under /leaky/<status>/ (a base URL for either SDK, the Files API, ...)
        is rejected with <status> and every request header, values included, in the error
        message: what a careless gateway does, for the secret-redaction tests."""
        status = request.path_params["status"]
        await request.body()
        if status not in LEAKY_ERRORS:
            return _error(404, f"leaky statuses are {sorted(LEAKY_ERRORS)}", "not_found_error")
        echoed = json.dumps(dict(request.headers))
        return _error(status, f"rejected; request headers: {echoed}", LEAKY_ERRORS[status])

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/bodies", bodies, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/leaky/{status:int}/{rest:path}", leaky, methods=["GET", "POST"]),
            *finetune_routes(FinetuneState()),
        ]
    )


def _openai(body: dict, model: str, state: SimState, fault: str | None) -> JSONResponse:
    system, pngs, tokens_in = "", [], 0
    for msg in body.get("messages", []):
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                tokens_in += _text_tokens(part["text"])
                if msg.get("role") in ("system", "developer"):
                    system += part["text"]
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                png = base64.b64decode(url.split(",", 1)[1])
                pngs.append(png)
                tokens_in += openai_image_tokens(
                    *_png_size(png), part["image_url"].get("detail", "high")
                )
    lang = _language(system)
    message: dict = {"role": "assistant", "content": None, "refusal": None}
    finish = "stop"
    if fault == "refusal":
        message["refusal"] = _TEXT[lang]["refusal"]
        text = message["refusal"]
    elif fault == "text_refusal":
        message["content"] = text = _TEXT[lang]["text_refusal"]
    else:
        fmt = body.get("response_format") or {}
        schema = (
            fmt.get("json_schema", {}).get("schema") if fmt.get("type") == "json_schema" else None
        )
        if not schema and not pngs:  # a plain text request: the impression (synthesis)
            text = _impression(body, lang)
        else:
            reading = _reading(pngs, model, lang, state)
            text = json.dumps(_fill(schema, reading) if schema else reading, ensure_ascii=False)
        if fault in ("malformed", "length"):
            text = text[: len(text) // 2]
        message["content"] = text
    tokens_out = _text_tokens(text)
    if fault == "length":
        finish = "length"
        tokens_out = body.get("max_completion_tokens") or body.get("max_tokens") or tokens_out
    usage = {
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "total_tokens": tokens_in + tokens_out,
    }
    return JSONResponse(
        {
            "id": f"chatcmpl-sim-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_PREFIX + model,
            "system_fingerprint": "radflow-simulator-test-double",
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            **({} if fault == "no_usage" else {"usage": usage}),
        }
    )


def _anthropic(body: dict, model: str, state: SimState, fault: str | None) -> JSONResponse:
    system = body.get("system") or ""
    if isinstance(system, list):
        system = "".join(b.get("text", "") for b in system)
    tokens_in, pngs = _text_tokens(system), []
    for msg in body.get("messages", []):
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "text":
                tokens_in += _text_tokens(part["text"])
            elif part.get("type") == "image":
                png = base64.b64decode(part["source"]["data"])
                pngs.append(png)
                tokens_in += anthropic_image_tokens(*_png_size(png))
    lang = _language(system)
    tools = {t["name"]: t for t in body.get("tools", [])}
    choice = body.get("tool_choice") or {}
    tool = tools.get(choice.get("name")) if choice.get("type") == "tool" else None
    if fault == "refusal":
        content, stop = [{"type": "text", "text": _TEXT[lang]["refusal"]}], "refusal"
    elif fault == "text_refusal":
        content, stop = [{"type": "text", "text": _TEXT[lang]["text_refusal"]}], "end_turn"
    else:
        reading = _reading(pngs, model, lang, state)
        if tool:
            payload = _fill(tool["input_schema"], reading)
            if fault == "malformed":
                payload = {"abnormal": "perhaps"}
            elif fault == "length":  # the tool input as far as it got
                payload = dict(list(payload.items())[:1])
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_sim_{uuid.uuid4().hex[:12]}",
                    "name": tool["name"],
                    "input": payload,
                }
            ]
            stop = "max_tokens" if fault == "length" else "tool_use"
        else:
            text = _impression(body, lang) if not pngs else json.dumps(reading, ensure_ascii=False)
            cut = fault in ("malformed", "length")
            content = [{"type": "text", "text": text[: len(text) // 2] if cut else text}]
            stop = "max_tokens" if fault == "length" else "end_turn"
    tokens_out = _text_tokens(json.dumps(content, ensure_ascii=False))
    if fault == "length":
        tokens_out = body.get("max_tokens") or tokens_out
    return JSONResponse(
        {
            "id": f"msg_sim_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": MODEL_PREFIX + model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            # a gateway that drops usage sends null (the SDK's Message needs the key)
            "usage": None
            if fault == "no_usage"
            else {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
    )
