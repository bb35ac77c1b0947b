"""Find studies: read DICOM headers only, group instances by StudyInstanceUID and series."""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from tasks.errors import (
    CorruptDicom,
    NotDicom,
    RadflowError,
    StorageError,
    StorageUnavailable,
    SymlinkEscape,
    UnsupportedImage,
)
from tasks.schema import ErrorRecord
from tasks.storage import ObjectRef, Store

__all__ = [
    "Instance",
    "Inventory",
    "Study",
    "discover_studies",
    "group_instances",
    "read_header",
    "retry_unless_permanent",
]

logger = logging.getLogger(__name__)

# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Checked because the
# StudyInstanceUID names a folder under DEST.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Header elements the pipeline needs; everything else (names, IDs, dates) is never kept.
_CONTEXT_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientSex", "PatientAge")


@dataclass(frozen=True)
class Instance:
    ref: ObjectRef
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    instance_number: int | None
    frames: int
    header: dict[str, str]  # the raw _CONTEXT_TAGS values; de-identified by tasks.context


@dataclass
class Study:
    study_instance_uid: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def series(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for inst in self.instances:
            out.setdefault(inst.series_instance_uid, []).append(inst)
        return out

    @property
    def modalities(self) -> list[str]:
        return sorted({i.modality for i in self.instances if i.modality})

    @property
    def fingerprint(self) -> str:
        """Hash of the input objects (key, size, version): a rerun skips the study on a match."""
        h = hashlib.sha256()
        for inst in sorted(self.instances, key=lambda i: i.ref.key):
            h.update(f"{inst.ref.key}\0{inst.ref.size}\0{inst.ref.version}\n".encode())
        return h.hexdigest()


@dataclass
class Inventory:
    studies: list[Study]
    errors: list[ErrorRecord]


def _uid(ds: pydicom.Dataset, keyword: str, source: str) -> str:
    value = str(ds.get(keyword, "") or "").strip().rstrip("\0")
    if not value:
        raise UnsupportedImage(f'"{source}" has no {keyword}')
    if len(value) > 64 or not _UID.match(value):
        raise CorruptDicom(f'"{source}" has an invalid {keyword} "{value[:80]}"')
    return value


def read_header(store: Store, ref: ObjectRef) -> Instance:
    """Parse the header of one object (no pixel data) into an :class:`Instance`."""
    if ref.size == 0:
        raise NotDicom(f'"{ref.uri}" is empty (0 bytes)')
    try:
        with store.open_header(ref.key) as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            at_end = ref.size > 0 and fh.tell() >= ref.size
    except InvalidDicomError as exc:
        raise NotDicom(f'"{ref.uri}" is not a DICOM file: no DICM preamble') from exc
    except (EOFError, ValueError, TypeError, KeyError, IndexError, OSError, struct.error) as exc:
        raise CorruptDicom(f'"{ref.uri}" has an unreadable header: {exc}') from exc
    sop_class = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
    try:
        study = _uid(ds, "StudyInstanceUID", ref.uri)
        series = _uid(ds, "SeriesInstanceUID", ref.uri)
        sop = _uid(ds, "SOPInstanceUID", ref.uri)
        if "Rows" not in ds or "Columns" not in ds:
            raise UnsupportedImage(f'"{ref.uri}" holds no image ({sop_class}): no Rows/Columns')
    except RadflowError as exc:
        # pydicom stops quietly at the end of the data: a cut file, not a UID-less one
        cut = isinstance(exc, CorruptDicom) or len(ds) == 0 or "Image Storage" in str(sop_class)
        if at_end and cut:
            found = f"{len(ds)} data elements" if len(ds) else "no data elements"
            what = str(exc.args[0]).removeprefix(f'"{ref.uri}" ')
            raise CorruptDicom(
                f'"{ref.uri}" has an unreadable header: truncated after {ref.size} bytes '
                f"({found} after the file meta header; {what})"
            ) from exc
        raise
    try:
        number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        number = None
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    header = {k: str(ds.get(k, "") or "") for k in _CONTEXT_TAGS}
    return Instance(ref, study, series, sop, header["Modality"], number, frames, header)


def group_instances(instances: Iterable[Instance]) -> tuple[list[Study], list[ErrorRecord]]:
    """Group by StudyInstanceUID; a repeated SOPInstanceUID becomes an error record."""
    studies: dict[str, Study] = {}
    seen: dict[str, str] = {}
    errors: list[ErrorRecord] = []
    for inst in sorted(instances, key=lambda i: i.ref.key):
        if inst.sop_instance_uid in seen:
            errors.append(
                ErrorRecord(
                    source=inst.ref.uri,
                    reason=f"duplicate instance: SOPInstanceUID {inst.sop_instance_uid} "
                    f'is already read from "{seen[inst.sop_instance_uid]}"',
                    kind="DuplicateInstance",
                    stage="discover",
                    study_instance_uid=inst.study_instance_uid,
                )
            )
            continue
        seen[inst.sop_instance_uid] = inst.ref.uri
        studies.setdefault(inst.study_instance_uid, Study(inst.study_instance_uid))
        studies[inst.study_instance_uid].instances.append(inst)
    for study in studies.values():
        study.instances.sort(
            key=lambda i: (i.series_instance_uid, i.instance_number or 0, i.ref.key)
        )
    return sorted(studies.values(), key=lambda s: s.study_instance_uid), errors


def error_record(ref: ObjectRef, exc: RadflowError, stage: str) -> ErrorRecord:
    return ErrorRecord(source=ref.uri, reason=str(exc), kind=exc.kind, stage=stage)


def _header_or_error(store: Store, ref: ObjectRef) -> Instance | ErrorRecord:
    """The object's header, or its error record; a StorageError (access denied, missing
    bucket, storage down after retries) is not about this object and stops the run, except
    a symlink leading out of the source folder, which is."""
    try:
        return read_header(store, ref)
    except SymlinkEscape as exc:
        return error_record(ref, exc, "discover")
    except StorageError:
        raise
    except RadflowError as exc:
        return error_record(ref, exc, "discover")


def retry_unless_permanent(task: object, task_run: object, state: Any) -> bool:
    """A Prefect ``retry_condition_fn`` for discovery: retry transient failures only, since a
    permanent StorageError would fail again the same way."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, StorageError) or isinstance(exc, StorageUnavailable)


def discover_studies(store: Store, workers: int = 16) -> Inventory:
    """List the source and read every header (``workers`` at once; S3 reads only the header
    bytes); unreadable objects become error records. A plain function, without Prefect
    (process-pool workers import this module for its data classes); the screening flow runs
    it as its ``discover-studies`` task."""
    instances: list[Instance] = []
    errors: list[ErrorRecord] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="header") as pool:
        for item in pool.map(lambda ref: _header_or_error(store, ref), store.list()):
            if isinstance(item, Instance):
                instances.append(item)
            else:
                errors.append(item)
    studies, dupes = group_instances(instances)
    logger.info(
        "found %d studies in %d instances, %d errors",
        len(studies),
        len(instances),
        len(errors) + len(dupes),
    )
    return Inventory(studies, errors + dupes)
