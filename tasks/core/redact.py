"""One redaction path for secrets: the error of every outbound call (readings, fallbacks, the
impression, the fine-tuning upload) and every log record of the process go through one
:class:`Redactor`. It replaces the secrets radflow resolved — API keys from env vars or Prefect
Secret blocks, every ``extra_headers`` value — and anything token-shaped (``Bearer …``,
``sk-…``-style keys, AWS access key ids, JWTs, echoed ``Authorization``/``x-api-key``/extra
header values) by ``***``."""

from __future__ import annotations

import json
import logging
import re
import threading
import traceback
from collections.abc import Iterable
from functools import cache
from urllib.parse import quote

__all__ = ["MASK", "MIN_SECRET_CHARS", "Redactor", "describe", "redact", "register"]

MASK = "***"
MIN_SECRET_CHARS = 8  # shorter values only go where they follow a header name
_SENSITIVE_HEADERS = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "cookie",
    "set-cookie",
    "x-amz-security-token",
)
_TOKEN_CHARS = r"[A-Za-z0-9._~+/=-]"
_SCHEME = re.compile(rf"(?i)\b(bearer|basic)(\s+)(?={_TOKEN_CHARS}*\d){_TOKEN_CHARS}{{8,}}")
_SHAPES = re.compile(
    r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{16,}"  # OpenAI / Anthropic style keys (sk-proj-, sk-ant-)
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+"  # JWTs
)


def _header_echo(names: Iterable[str]) -> re.Pattern[str]:
    """``name: value``, ``name=value``, ``"name": "value"`` and ``'name': 'value'`` for the
    given header names; the value may carry an auth scheme (``Bearer …``)."""
    alternatives = "|".join(sorted({re.escape(n.lower()) for n in names}, key=len, reverse=True))
    return re.compile(
        rf"(?i)([\"']?)\b({alternatives})\1(\s*[:=]\s*)([\"']?)"
        r"(?:(?:bearer|basic|token)\s+)?[^\s\"',;}\]]+"
    )


class Redactor:
    """Known secrets (replaced wherever they appear, also percent-encoded or JSON-escaped) plus
    token-shaped strings. Thread-safe: ``add`` swaps in a new pattern, calls read one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._names: frozenset[str] = frozenset(_SENSITIVE_HEADERS)
        self._literal: re.Pattern[str] | None = None
        self._echo = _header_echo(self._names)

    def add(self, *secrets: str | None, header_names: Iterable[str] = ()) -> None:
        """Treat ``secrets`` (values of fewer than MIN_SECRET_CHARS characters are too short
        to replace everywhere) and whatever follows ``header_names`` as secret from now on."""
        forms = {
            form
            for s in secrets
            if s and len(s) >= MIN_SECRET_CHARS
            for form in (s, quote(s, safe=""), json.dumps(s)[1:-1], s.replace("/", "\\/"))
        }
        names = {n.lower() for n in header_names}
        with self._lock:
            if forms - self._secrets:
                self._secrets |= forms
                ordered = sorted(self._secrets, key=len, reverse=True)  # longest first
                self._literal = re.compile("|".join(map(re.escape, ordered)))
            if names - self._names:
                self._names |= names
                self._echo = _header_echo(self._names)

    def __call__(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(MASK, text)
        text = self._echo.sub(rf"\1\2\1\3\4{MASK}", text)
        text = _SCHEME.sub(rf"\1\2{MASK}", text)
        return _SHAPES.sub(MASK, text)

    def error(self, exc: BaseException) -> str:
        """``"<type>: <message>"`` of an exception, redacted: how errors are recorded."""
        return self(f"{type(exc).__name__}: {exc}")


_PROCESS = Redactor()  # every secret this process resolved


def register(*secrets: str | None, header_names: Iterable[str] = ()) -> None:
    """Add secrets to the process's redactor (``tasks.core.config`` does, as it resolves keys and
    builds SDK clients) and make sure every log record of the process is scrubbed."""
    _PROCESS.add(*secrets, header_names=header_names)
    _install_log_hook()


def redact(text: str) -> str:
    """``text`` without any secret of this process or token-shaped string."""
    return _PROCESS(text)


def describe(exc: BaseException) -> str:
    """The recorded form of an outbound call's error: ``"<type>: <message>"``, redacted."""
    return _PROCESS.error(exc)


def _scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Redact a record's message (arguments merged in) and traceback, once, as it is made."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError, KeyError):  # a malformed call: keep it, without secrets
        message = f"{record.msg} {record.args!r}"
    clean = _PROCESS(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = _PROCESS(text)
        if clean != text:  # the formatters print exc_text; nothing re-renders the exception
            record.exc_text, record.exc_info = clean, None
    if record.stack_info:
        record.stack_info = _PROCESS(record.stack_info)
    return record


@cache
def _install_log_hook() -> None:
    """Wrap the record factory: every logger (radflow's, Prefect's, the SDKs', httpx's) and
    every handler (console, Prefect API, files) only ever sees scrubbed records."""
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return _scrub(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
