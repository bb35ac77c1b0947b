"""Pseudonyms for what Prefect shows: logs, artifacts, run names and tags name a study and a
source by a keyed hash (HMAC-SHA256 with a secret kept in DEST), not by UID or path.

A StudyInstanceUID is an identifier (a PACS looks it up) and a plain hash of one is not a
pseudonym: whoever can list the PACS's UIDs can hash them all and match. With a key that only
DEST holds, a log line names a study stably (same DEST, same name, run after run) and only
someone who can read DEST, where the reports and their UIDs are anyway, can map it back
(report.json ``log_id``, or ``radflow lookup DEST LOG_ID``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.core.config import PrivacyConfig
from tasks.core.errors import ConfigError
from tasks.storage import Store

__all__ = ["KEY_NAME", "LogNames", "find_studies", "load_key", "log_names", "store_scheme"]

KEY_NAME = "privacy/log-key.json"
_KEY_BYTES = 32


def store_scheme(uri: str | None) -> str:
    """``s3`` for ``s3://…``, the scheme of any other URI, ``local`` for a folder."""
    if not uri:
        return "config"
    return uri.split("://", 1)[0].lower() if "://" in uri else "local"


@dataclass(frozen=True)
class LogNames:
    """How logs, artifacts, run names and tags name studies and sources: by pseudonym when
    there is a ``key`` (``privacy.log_uids: hash``), as they are otherwise (``plain``)."""

    key: bytes | None = None

    @property
    def plain(self) -> bool:
        return self.key is None

    def study(self, uid: str) -> str:
        """The study's log id: 16 hex digits (64 bits), or the UID when plain."""
        return uid if self.key is None else _mac(self.key, "study", uid)[:16]

    def source(self, uri: str) -> str:
        """``<scheme>-<10 hex digits>`` (e.g. ``s3-3f9a0c1d2e``), or the URI when plain."""
        if self.key is None:
            return uri
        return f"{store_scheme(uri)}-{_mac(self.key, 'source', uri)[:10]}"


def _mac(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``value``, domain-separated by ``kind``, as hex."""
    return hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()


def load_key(dest: Store, *, create: bool = True) -> bytes:
    """DEST's pseudonym key from ``DEST/privacy/log-key.json``, made (32 random bytes) when
    there is none and ``create``; of runs that start at once on a new DEST, the first to
    write it wins (a conditional create) and all use that one."""
    if not dest.exists(KEY_NAME):
        if not create:
            raise ConfigError(
                f'"{dest.uri}" has no {KEY_NAME}',
                hint="its runs named studies by UID (privacy.log_uids: plain), or none ran",
            )
        body = {
            "purpose": "radflow log pseudonyms (HMAC-SHA256 of StudyInstanceUIDs and sources); "
            "whoever holds this key can map log ids back to studies",
            "key": secrets.token_hex(_KEY_BYTES),
        }
        dest.put_if(KEY_NAME, json.dumps(body, indent=2).encode(), None, "application/json")
    raw = dest.read_bytes(KEY_NAME)
    try:  # the file's text and shape only: the store's errors keep their meaning
        key = bytes.fromhex(json.loads(raw)["key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f'"{dest.uri}/{KEY_NAME}" is not a radflow log key ({type(exc).__name__})',
            hint="restore it from a backup, or delete it: new runs then use new log ids",
        ) from None
    if len(key) < 16:
        raise ConfigError(f'"{dest.uri}/{KEY_NAME}" holds a key shorter than 16 bytes')
    return key


def log_names(dest: Store, config: PrivacyConfig) -> LogNames:
    """The run's naming: pseudonyms keyed by DEST (``hash``) or names as they are."""
    return LogNames(load_key(dest) if config.log_uids == "hash" else None)


def find_studies(studies: Store, names: LogNames, log_ids: Iterable[str]) -> dict[str, str]:
    """Log id → StudyInstanceUID for the reported studies of ``studies`` (a store rooted at
    ``DEST/studies``): lists the keys only, reads no report."""
    wanted = {i.strip().lower() for i in log_ids}
    found: dict[str, str] = {}
    for ref in studies.list():
        uid, _, name = ref.key.partition("/")
        if name == "report.json" and (log_id := names.study(uid)) in wanted:
            found[log_id] = uid
    return found
