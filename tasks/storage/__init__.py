"""Where studies come from and reports go: a local folder, S3 or a PACS, behind one small
interface (:class:`Store`, in ``base``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.storage.base import ObjectRef, Store, read_json, split_uri
from tasks.storage.local import LocalStore

if TYPE_CHECKING:
    from tasks.core.config import StorageConfig

__all__ = ["LocalStore", "ObjectRef", "Store", "open_store", "read_json", "split_uri"]


def open_store(uri: str, config: StorageConfig | None = None) -> Store:
    """A store for ``uri``: ``s3://bucket/prefix`` (checked at once: a missing or forbidden
    bucket fails here with one line), a PACS ``dicomweb+http(s)://HOST:PORT/PATH[?filters]``
    (searched once at once, likewise; see tasks/pacs) or a local folder."""
    if uri.startswith("dicomweb+"):
        from tasks.core.config import StorageConfig
        from tasks.pacs.store import DicomWebStore

        pacs = DicomWebStore(uri, config or StorageConfig())
        pacs.check()
        return pacs
    if uri.startswith("s3://"):
        from tasks.core.config import StorageConfig
        from tasks.storage.s3 import S3Store

        store = S3Store(uri, config or StorageConfig())
        store.check()
        return store
    return LocalStore(uri)
