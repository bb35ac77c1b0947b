"""Content-addressed cache of model readings, so a rerun, a retry or a resume never pays twice."""

from __future__ import annotations

import hashlib
import json
import logging

from pydantic import ValidationError

from tasks.core.schema import ModelReading
from tasks.storage import Store

__all__ = ["CACHE_PREFIX", "ReadingCache", "reading_key"]

logger = logging.getLogger(__name__)

CACHE_PREFIX = "cache/readings"
KEY_VERSION = "1"


def reading_key(
    image_sha256: list[str],
    prompt_version: str,
    user_text: str,
    provider: str,
    model_id: str,
    endpoint: str,
    params: dict[str, object],
) -> str:
    """sha256 of everything that decides the answer: the images (in order), the prompt version,
    the user message (de-identified context), provider, model id, endpoint and call parameters."""
    material = {
        "v": KEY_VERSION,
        "images": image_sha256,
        "prompt": prompt_version,
        "user": user_text,
        "provider": provider,
        "model": model_id,
        "endpoint": endpoint,
        "params": params,
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ReadingCache:
    """Readings stored as ``<prefix>/<key[:2]>/<key>.json`` in a Store (local folder or S3).

    Only successful readings are stored; a failure is always asked again. Blocking I/O: call
    from a worker thread in async code.
    """

    def __init__(self, store: Store, prefix: str = CACHE_PREFIX) -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def path(self, key: str) -> str:
        return f"{self.prefix}/{key[:2]}/{key}.json"

    def get(self, key: str) -> ModelReading | None:
        """The stored reading marked ``cached=True``, or None (a corrupt entry counts as none)."""
        path = self.path(key)
        if not self.store.exists(path):
            return None
        try:
            reading = ModelReading.model_validate_json(self.store.read_bytes(path))
        except ValidationError as exc:
            logger.warning("cache entry %s is unreadable, asking again: %s", path, exc)
            return None
        return reading.model_copy(update={"cached": True})

    def put(self, key: str, reading: ModelReading) -> bool:
        """Store ``reading`` if it is a success; returns whether it was stored."""
        if not reading.ok:
            return False
        data = reading.model_copy(update={"cached": False, "cache_key": key})
        self.store.write_bytes(self.path(key), data.model_dump_json().encode(), "application/json")
        return True
