"""A local folder as a Store: atomic writes, conditional writes for claims, and no key that
leads out of the folder (lexically or through a symlink)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tasks.core.errors import StorageError, SymlinkEscape
from tasks.storage.base import ObjectRef

__all__ = ["LocalStore"]

logger = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore:
    """A folder; listing is recursive and ignores hidden files and folders.

    A key may not lead out of the folder, lexically ("..") or through a symlink: a folder
    on a key's way is checked once (one lstat; a realpath only for a symlink), a file that is
    a symlink when it is opened. A symlink that stays inside the folder is followed. Writes
    replace a symlinked file, never write through it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        self._top = os.path.abspath(self.root)
        self._safe: set[str] = set()  # folders on the way of a key, checked: inside the root

    def _path(self, key: str) -> Path:
        # lexical, not realpath(): resolving every key was the largest cost of writing a
        # report in the bench-screen profile; a key may not climb out with ".." or "/"
        path = os.path.normpath(os.path.join(self._top, key))
        if os.path.commonpath((path, self._top)) != self._top or path == self._top:
            raise StorageError(f'key "{key}" escapes the folder "{self.root}"')
        return Path(path)

    def _outside(self, path: str) -> str | None:
        """Where the symlink ``path`` leads, if that is out of the root."""
        real, top = os.path.realpath(path), os.path.realpath(self._top)
        return None if os.path.commonpath((real, top)) == top else real

    def _escape(self, key: str, path: str, real: str) -> SymlinkEscape:
        link = os.path.relpath(path, self._top)
        return SymlinkEscape(
            f'key "{key}" leads out of the folder "{self.root}": "{link}" is a symlink to "{real}"'
        )

    def _folder(self, path: str, key: str, create: bool = False) -> None:
        """Check that the folder ``path`` of ``key`` is inside the root, each folder on its
        way once; with ``create``, make the missing ones (never through a symlink)."""
        if path in self._safe:
            return
        if path == self._top:
            if create:
                os.makedirs(path, exist_ok=True)
            if create or os.path.isdir(path):
                self._safe.add(path)  # the root itself may be a symlink: the user's choice
            return
        self._folder(os.path.dirname(path), key, create)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if not create:
                return  # nothing on the way yet: the read finds no object
            with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
                os.mkdir(path)
            mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            if real := self._outside(path):
                raise self._escape(key, path, real)
        elif not stat.S_ISDIR(mode):
            return  # a file in the way: the access fails on it (checked again next time)
        self._safe.add(path)

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        self._folder(str(path.parent), key)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's ELOOP
                raise
            if real := self._outside(str(path)):
                raise self._escape(key, str(path), real) from None
            fd = os.open(path, os.O_RDONLY)  # a symlink inside the folder
        return os.fdopen(fd, "rb")

    def list(self) -> Iterator[ObjectRef]:
        """Every file, in key order. A symlink leading out of the folder is listed (reading
        it fails with :class:`SymlinkEscape`, an error record); a folder symlink leading
        inside is not walked (its files are listed where they are)."""
        if not self.root.is_dir():
            raise StorageError(f'source folder "{self.root}" does not exist')
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out = [
                d
                for d in dirnames
                if os.path.islink(os.path.join(dirpath, d))
                and self._outside(os.path.join(dirpath, d))
            ]
            for name in sorted(filenames + out):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode) and not self._outside(str(path)):
                    with contextlib.suppress(OSError):  # dangling: fails as it is read
                        info = path.stat()
                key = path.relative_to(self.root).as_posix()
                yield ObjectRef(str(path), key, info.st_size, str(info.st_mtime_ns))

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with self._open(key) as fh:
            yield fh

    def open_header(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.open_read(key)

    def read_bytes(self, key: str) -> bytes:
        with self._open(key) as fh:
            return fh.read()

    def _temp(self, path: Path, key: str, data: bytes) -> str:
        """``data`` in a new hidden file beside ``path`` (its folder checked, or made)."""
        self._folder(str(path.parent), key, create=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:  # a folder checked before was removed since: again
            self._safe -= {str(p) for p in path.parents}
            self._folder(str(path.parent), key, create=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def write_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a report."""
        path = self._path(key)
        tmp = self._temp(path, key, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self._folder(str(path.parent), key)
        return path.is_file()

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.read_bytes(key)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        """An exclusive lock on ``folder``'s ``.lock`` file (flock: the kernel drops it when
        its holder dies), held while a conditional write compares and swaps."""
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _version(self, key: str) -> str | None:
        current = self.read_versioned(key)
        return current[1] if current else None

    def put_if(
        self, key: str, data: bytes, version: str | None, content_type: str = ""
    ) -> str | None:
        """A new object is a hard link of a complete temp file (``link`` fails if the name
        exists: an exclusive create, never half a file); a replacement compares and renames
        under the folder's lock, as :meth:`delete_if` does, so one of racing writers wins."""
        path = self._path(key)
        tmp = self._temp(path, key, data)
        try:
            if version is None:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return None
                return _digest(data)
            with self._locked(path.parent):
                if self._version(key) != version:
                    return None
                os.replace(tmp, path)
                return _digest(data)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete_if(self, key: str, version: str) -> bool:
        path = self._path(key)
        self._folder(str(path.parent), key)
        if not path.parent.is_dir():
            return False
        with self._locked(path.parent):
            if self._version(key) != version:
                return False
            path.unlink()
            return True

    def list_keys(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/") + "/"
        path = self._path(folder)
        self._folder(str(path), folder)
        return sorted(folder + ref.key for ref in LocalStore(path).list()) if path.is_dir() else []

    def delete(self, key: str) -> None:
        """Unlink ``key`` (a symlink itself, never what it points to)."""
        path = self._path(key)
        self._folder(str(path.parent), key)
        path.unlink(missing_ok=True)
