"""A PACS as a radflow source: QIDO-RS finds the studies (page by page), WADO-RS metadata (no
pixels) lists each study's instances and serves their headers, and WADO-RS retrieves only
the instances a model is shown. Read only: reports go to DEST, SRs back through STOW-RS."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from tasks.core.errors import (
    CorruptDicom,
    NotDicom,
    PacsError,
    RadflowError,
    StorageError,
    StorageUnavailable,
)
from tasks.pacs.dicomweb import UID, PacsClient, parse_dicomweb_uri
from tasks.reports.sr import sr_series_uid
from tasks.storage.base import ObjectRef

if TYPE_CHECKING:
    from tasks.core.config import StorageConfig

__all__ = ["DicomWebStore", "instance_key"]

logger = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
# Not part of what an instance says: where this server would serve it from (PS3.18 10.6.3)
_TRANSPORT = frozenset({"00081190"})
# What a hostile metadata document can make pydicom raise while reading or encoding it
_BAD_DATA = (ValueError, TypeError, KeyError, IndexError, AttributeError, LookupError)
_BAD_DATA += (OverflowError, NotImplementedError, RecursionError, struct.error)
_SPOOL = 32 * 2**20  # a retrieved instance stays in memory up to this size, then on disk


def instance_key(study: str, series: str, sop: str) -> str:
    """The key of an instance in a DICOMweb store: its WADO-RS path under the root."""
    return f"studies/{study}/series/{series}/instances/{sop}"


def _uids_of(key: str) -> tuple[str, str, str]:
    parts = key.split("/")
    if len(parts) != 6 or parts[0::2] != ["studies", "series", "instances"]:
        raise StorageError(f'"{key}" is not an instance key (studies/U/series/U/instances/U)')
    uids = parts[1], parts[3], parts[5]
    if not all(len(u) <= 64 and UID.match(u) for u in uids):
        raise CorruptDicom(f'"{key}" holds an invalid UID')
    return uids


def _value(item: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object (PS3.18 F.2), as a string."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    first = values[0] if isinstance(values, list) and values else ""
    return first.strip() if isinstance(first, str) else ""


def _without_bulk(item: dict, depth: int = 0) -> dict:
    """The object without bulk data (its URIs are never followed), pixel data and what
    follows it (as ``stop_before_pixels``), and the server's retrieve URL; sequence items
    likewise, down to a nesting depth no real header reaches."""
    if depth > 32:
        raise CorruptDicom(f"metadata nested more than {depth} sequences deep")
    out = {}
    for tag, element in item.items():
        if not isinstance(tag, str) or tag.upper() >= "7FE00010" or tag.upper() in _TRANSPORT:
            continue
        if isinstance(element, dict):
            if "BulkDataURI" in element:
                continue
            values = element.get("Value")
            if element.get("vr") == "SQ" and isinstance(values, list):
                items = [_without_bulk(v, depth + 1) if isinstance(v, dict) else v for v in values]
                element = {**element, "Value": items}
        out[tag] = element
    return out


def header_bytes(item: Any, where: str) -> bytes:
    """A DICOM JSON instance (WADO-RS metadata) as the Part-10 header radflow parses: the file
    meta, then the data set, without pixel data. Hostile values fail as one CorruptDicom."""
    if not isinstance(item, dict):
        raise CorruptDicom(f'"{where}": a metadata item is a JSON {type(item).__name__}')
    try:
        ds = pydicom.Dataset.from_json(_without_bulk(item))
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or "0"
        ds.file_meta = meta
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    except _BAD_DATA as exc:
        raise CorruptDicom(f'"{where}" has metadata that is not valid DICOM: {exc}') from None
    return buffer.getvalue()


class DicomWebStore:
    """A DICOMweb source, ``dicomweb+http(s)://HOST:PORT/PATH[?QIDO filters]``.

    Keys are WADO-RS paths (``studies/S/series/R/instances/I``). ``received`` is every body
    byte the server sent (searches, metadata, instances); a study whose metadata could not be
    had is listed as one object, ``studies/S``, that fails with the reason: an error record."""

    def __init__(self, uri: str, config: StorageConfig) -> None:
        self.uri = uri
        self.storage = config
        self.config = config.dicomweb
        self.source = parse_dicomweb_uri(uri)
        self.client = PacsClient(self.source.base_url, self.config)
        self._headers: dict[str, bytes] = {}
        self._failed: dict[str, RadflowError] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.config.max_concurrency)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "config": self.storage}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["config"])

    @property
    def received(self) -> int:
        return self.client.received

    def uri_of(self, key: str) -> str:
        return f"{self.source.root_uri}/{key}"

    def _url(self, path: str) -> str:
        return f"{self.source.base_url}/{path}"

    def _search(self, limit: int, offset: int) -> list[Any]:
        """One QIDO-RS study search page; failing it fails the run (one clear line)."""
        url = self._url("studies")
        try:
            page = self.client.call(
                "QIDO-RS study search",
                url,
                self.client.web.search_for_studies,
                limit=limit,
                offset=offset,
                fuzzymatching=self.source.fuzzymatching,
                search_filters=dict(self.source.filters),
                fields=["StudyInstanceUID"],
            )
        except RadflowError as exc:  # the run cannot go on without its search
            kind = StorageUnavailable if getattr(exc, "transient", False) else StorageError
            raise kind(str(exc.args[0]), hint=exc.hint) from None
        if not isinstance(page, list):
            raise StorageError(f"QIDO-RS study search at {url}: the answer is not a JSON array")
        return page

    def check(self) -> None:
        """Fail fast (one line) when the server cannot be searched: down, wrong URL, 401."""
        self._search(1, 0)

    def studies(self) -> Iterator[str]:
        """Every matching StudyInstanceUID once, searching page by page (QIDO-RS limit and
        offset) until a page is empty, or repeats the previous one word for word (a server
        that ignores offset)."""
        size = self.source.limit or self.config.page_size
        offset, seen, previous = self.source.offset, set(), None
        while True:
            page = self._search(size, offset)
            if not page or page == previous:
                return
            for item in page:
                uid = _value(item, STUDY_UID) if isinstance(item, dict) else ""
                if len(uid) > 64 or not UID.match(uid):
                    logger.warning("QIDO-RS answer item without a valid StudyInstanceUID skipped")
                elif uid not in seen:  # a UID under two patients is listed twice
                    seen.add(uid)
                    yield uid
            offset, previous = offset + len(page), page

    def list(self) -> Iterator[ObjectRef]:
        with ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="wado") as pool:
            for refs in pool.map(self._study_refs, self.studies()):
                yield from refs

    def _failed_ref(self, key: str, error: RadflowError) -> ObjectRef:
        with self._lock:
            self._failed[key] = error
        return ObjectRef(self.uri_of(key), key, 1, "failed")

    def _study_refs(self, study: str) -> list[ObjectRef]:
        """The study's instances from its WADO-RS metadata, headers kept for ``open_header``;
        radflow's own SR series is not an input."""
        url = self._url(f"studies/{study}/metadata")
        try:
            items = self.client.call(
                "WADO-RS study metadata", url, self.client.web.retrieve_study_metadata, study
            )
            if not isinstance(items, list):
                raise PacsError(f"WADO-RS study metadata at {url}: not a JSON array")
            if len(items) > self.config.max_instances_per_study:
                raise PacsError(
                    f"WADO-RS study metadata at {url} lists {len(items)} instances, more "
                    f"than dicomweb.max_instances_per_study ({self.config.max_instances_per_study})"
                )
        except RadflowError as exc:
            return [self._failed_ref(f"studies/{study}", exc)]
        ours = sr_series_uid(study)
        refs = []
        for n, item in enumerate(items):
            series = _value(item, SERIES_UID) if isinstance(item, dict) else ""
            sop = _value(item, SOP_UID) if isinstance(item, dict) else ""
            if series == ours:
                continue
            where = f"{url} item {n + 1}"
            try:
                for what, uid in (("SeriesInstanceUID", series), ("SOPInstanceUID", sop)):
                    if len(uid) > 64 or not UID.match(uid):
                        raise CorruptDicom(f'"{where}" has an invalid {what} "{uid[:80]}"')
                if _value(item, STUDY_UID) != study:
                    raise CorruptDicom(f'"{where}" belongs to another study')
                key = instance_key(study, series, sop)
                header = header_bytes(item, self.uri_of(key))
            except RadflowError as exc:
                refs.append(self._failed_ref(f"studies/{study}/metadata/{n + 1}", exc))
                continue
            with self._lock:
                self._headers[key] = header
            size = len(json.dumps(item))  # > the header's size: never taken for a cut file
            refs.append(ObjectRef(self.uri_of(key), key, size, hashlib.sha256(header).hexdigest()))
        return refs

    @contextlib.contextmanager
    def open_header(self, key: str) -> Iterator[BinaryIO]:
        """The header from the metadata (kept from ``list``, else asked for): no pixels."""
        with self._lock:
            failed = self._failed.pop(key, None)
            header = self._headers.pop(key, None)
        if failed is not None:
            raise failed
        if header is None:
            study, series, sop = _uids_of(key)
            url = self._url(f"{key}/metadata")
            with self._slots:
                item = self.client.call(
                    "WADO-RS instance metadata",
                    url,
                    self.client.web.retrieve_instance_metadata,
                    study,
                    series,
                    sop,
                )
            header = header_bytes(item, self.uri_of(key))
        yield io.BytesIO(header)

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """The instance by WADO-RS retrieve, in the transfer syntax it is stored in (no
        transcoding), spooled to a temporary file past 32 MiB."""
        study, series, sop = _uids_of(key)
        url = self._url(key)
        with self._slots:
            try:
                ds = self.client.call(
                    "WADO-RS retrieve", url, self.client.web.retrieve_instance, study, series, sop
                )
            except InvalidDicomError:
                raise NotDicom(
                    f"WADO-RS retrieve of {url}: the response is not a DICOM file"
                ) from None
            except (EOFError, struct.error) as exc:
                raise CorruptDicom(f"WADO-RS retrieve of {url}: a cut DICOM file ({exc})") from None
        if str(ds.get("SOPInstanceUID", "")) != sop:
            raise CorruptDicom(f"WADO-RS retrieve of {url} answered another instance")
        with tempfile.SpooledTemporaryFile(_SPOOL, prefix="radflow-wado-") as tmp:
            try:
                ds.save_as(tmp, enforce_file_format=True)
            except _BAD_DATA as exc:
                raise CorruptDicom(f"WADO-RS retrieve of {url}: not valid DICOM ({exc})") from None
            del ds
            tmp.seek(0)
            yield tmp  # type: ignore[misc]

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as fh:
            return fh.read()

    def write_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        raise StorageError(
            f'cannot write "{key}" to {self.source.root_uri}: a DICOMweb server is a source',
            hint="write reports to a folder or s3:// DEST; publish SRs with publish: {dicomweb: ...}",
        )

    def exists(self, key: str) -> bool:
        return False
