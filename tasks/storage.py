"""Where studies come from and reports go: a local folder or S3, behind one small interface."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from tasks.errors import StorageError

if TYPE_CHECKING:
    from tasks.config import StorageConfig

__all__ = ["ObjectRef", "Store", "LocalStore", "open_store"]

logger = logging.getLogger(__name__)


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


class LocalStore:
    """A folder; listing is recursive and ignores hidden files and folders."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        self._top = os.path.abspath(self.root)

    def _path(self, key: str) -> Path:
        # lexical, not realpath(): resolving every key was the largest cost of writing a
        # report in the bench-screen profile; a key may not climb out with ".." or "/"
        path = os.path.normpath(os.path.join(self._top, key))
        if os.path.commonpath((path, self._top)) != self._top or path == self._top:
            raise StorageError(f'key "{key}" escapes the folder "{self.root}"')
        return Path(path)

    def list(self) -> Iterator[ObjectRef]:
        if not self.root.is_dir():
            raise StorageError(f'source folder "{self.root}" does not exist')
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                stat = path.stat()
                key = path.relative_to(self.root).as_posix()
                yield ObjectRef(str(path), key, stat.st_size, str(stat.st_mtime_ns))

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with open(self._path(key), "rb") as fh:
            yield fh

    def open_header(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.open_read(key)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a report."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


def read_json(store: Store, key: str) -> dict | None:
    """The JSON object at ``key``, or None when there is none."""
    if not store.exists(key):
        return None
    return json.loads(store.read_bytes(key))


def open_store(uri: str, config: StorageConfig | None = None) -> Store:
    """A store for ``uri``: ``s3://bucket/prefix`` (checked at once: a missing or forbidden
    bucket fails here with one line), a PACS ``dicomweb+http(s)://HOST:PORT/PATH[?filters]``
    (searched once at once, likewise; see tasks/pacs) or a local folder."""
    if uri.startswith("dicomweb+"):
        from tasks.config import StorageConfig
        from tasks.pacs.store import DicomWebStore

        pacs = DicomWebStore(uri, config or StorageConfig())
        pacs.check()
        return pacs
    if uri.startswith("s3://"):
        from tasks.config import StorageConfig
        from tasks.s3 import S3Store

        store = S3Store(uri, config or StorageConfig())
        store.check()
        return store
    return LocalStore(uri)
