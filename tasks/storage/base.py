"""The Store protocol every source and destination implements, and what is shared by all:
reading a JSON object, and splitting a file's URI into its store and key."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from tasks.core.errors import StorageError

__all__ = ["ObjectRef", "Store", "read_json", "split_uri"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


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


def split_uri(uri: str) -> tuple[str, str]:
    """(store root, key) of one file, for ``open_store(root).read_bytes(key)``:

    - ``s3://bucket/a/b.csv`` → ("s3://bucket/a", "b.csv"); ``s3://bucket/b.csv`` →
      ("s3://bucket", "b.csv");
    - ``/data/b.csv`` → ("/data", "b.csv"); ``/b.csv`` → ("/", "b.csv"); ``b.csv`` →
      (".", "b.csv"); ``dir/b.csv`` → ("dir", "b.csv");
    - trailing slashes are dropped: ``dir/b.csv/`` is ``dir/b.csv``.

    A URI that names no file (``""``, ``/``, ``s3://bucket``, a last part ``.`` or ``..``) or
    has another scheme (a PACS holds no such files) is a :class:`StorageError` naming it."""
    path = uri.rstrip("/")
    scheme = _SCHEME.match(path)
    if scheme and scheme.group() != "s3://":
        raise StorageError(
            f'"{uri}" is neither an s3:// URI nor a local path',
            hint="give s3://bucket/key or the path of a file",
        )
    head, sep, name = path.rpartition("/")
    if name in ("", ".", "..") or (scheme and len(head) <= len("s3://")):
        raise StorageError(f'"{uri}" names no file', hint="give s3://bucket/key or a file's path")
    if not sep:
        return ".", name
    return head or "/", name
