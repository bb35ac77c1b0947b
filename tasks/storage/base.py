"""The Store protocol every source and destination implements, and what is shared by all."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

__all__ = ["ObjectRef", "Store", "read_json"]


@dataclass(frozen=True)
class ObjectRef:
    """One input object: ``key`` is relative to the store root and '/'-separated."""

    uri: str
    key: str
    size: int
    version: str  # mtime (local) or ETag (S3): changes when the content does


class Store(Protocol):
    uri: str

    def list(self) -> Iterator[ObjectRef]: ...

    def open_header(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """The start of the object, for header parsing: S3 fetches only what is read."""
        ...

    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under the folder ``prefix`` (relative to the store root), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; one that is already gone is not an error."""
        ...

    # conditional writes, for claims (tasks/screening/claims.py): a version is an opaque token of one
    # state of an object (its ETag on S3, a digest of its bytes in a folder)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version, or None when there is none."""
        ...

    def put_if(
        self, key: str, data: bytes, version: str | None, content_type: str = ...
    ) -> str | None:
        """Write ``data`` only if the object is still at ``version`` (None: only if there is
        no object), atomically; the new version, or None when the condition failed."""
        ...

    def delete_if(self, key: str, version: str) -> bool:
        """Delete the object only if it is still at ``version``; whether it was deleted."""
        ...


def read_json(store: Store, key: str) -> dict | None:
    """The JSON object at ``key``, or None when there is none."""
    if not store.exists(key):
        return None
    return json.loads(store.read_bytes(key))
