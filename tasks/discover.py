"""Find studies: read DICOM headers only, group instances by StudyInstanceUID and series."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pydicom
from pydicom.errors import InvalidDicomError

from tasks.errors import (
    CorruptDicom,
    NotDicom,
    RadflowError,
    StorageError,
    SymlinkEscape,
    UnsupportedImage,
    parser_error,
)
from tasks.schema import ErrorRecord
from tasks.storage import ObjectRef, Store

__all__ = [
    "Instance",
    "Inventory",
    "MAX_NESTING",
    "Study",
    "discover_studies",
    "group_instances",
    "read_header",
]

logger = logging.getLogger(__name__)

# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Checked because the
# StudyInstanceUID names a folder under DEST.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Header elements the pipeline needs; everything else (names, IDs, dates) is never kept.
_CONTEXT_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientSex", "PatientAge")
# Sequences nested deeper than this are refused at discovery: real objects nest a few levels
# (an SR content tree a dozen or two), and code that walks a header recursively (pydicom's
# own reader, the SR's deep copy of the patient module) hits Python's recursion limit at
# about 200 levels.
MAX_NESTING = 64
_IMAGE_TAGS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")
_READ = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    *_IMAGE_TAGS,
    *_CONTEXT_TAGS,
)


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
    frame_bytes: int = 0  # decoded bytes of one frame, as the header claims (decode budget)
    transfer_syntax: str = ""  # (0002,0010), "" when the file has none


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


def _uid(tags: dict[str, str], keyword: str, source: str) -> str:
    value = tags[keyword].strip().rstrip("\0")
    if not value:
        raise UnsupportedImage(f'"{source}" has no {keyword}')
    if len(value) > 64 or not _UID.match(value):
        raise CorruptDicom(f'"{source}" has an invalid {keyword} "{value[:80]}"')
    return value


def _int(text: str, default: int | None) -> int | None:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _frame_bytes(tags: dict[str, str]) -> int:
    """Decoded bytes of one frame as the header claims them (PS3.3 C.7.6.3): rows × columns
    × samples × bytes per sample; 0 when a value is missing, not a number or negative."""
    rows, cols, bits = (max(0, _int(tags[k], 0) or 0) for k in ("Rows", "Columns", "BitsAllocated"))
    samples = max(1, _int(tags["SamplesPerPixel"], 1) or 1)
    return rows * cols * samples * -(-bits // 8)


def _convert_all(ds: pydicom.Dataset, source: str, depth: int = 0) -> None:
    """Convert every value of the header. pydicom converts a value, and parses a sequence of
    defined length, when it is first used: done here (≈ 7 µs an element), a hostile value
    fails inside the parser's boundary rather than later in whatever code reads it (such as
    the SR's deep copy of the patient module), and nesting is refused past ``MAX_NESTING``."""
    for elem in ds:
        if elem.VR == "SQ":
            if depth == MAX_NESTING:
                raise CorruptDicom(
                    f'"{source}" has an unreadable header: nesting too deep (more than '
                    f"{MAX_NESTING} levels of nested sequences)"
                )
            for item in elem.value:
                _convert_all(item, source, depth + 1)


def read_header(store: Store, ref: ObjectRef) -> Instance:
    """Parse the header of one object (no pixel data) into an :class:`Instance`. Anything
    the parser raises for the object (struct.error, RecursionError from nesting too deep,
    ...) is a CorruptDicom naming it; the store's own errors keep their meaning."""
    if ref.size == 0:
        raise NotDicom(f'"{ref.uri}" is empty (0 bytes)')
    try:
        with store.open_header(ref.key) as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            at_end = ref.size > 0 and fh.tell() >= ref.size
        _convert_all(ds, ref.uri)
        tags = {k: str(ds.get(k, "") or "") for k in _READ}
        uid = ds.get("SOPClassUID")
        sop_class = str(getattr(uid, "name", tags["SOPClassUID"] or "unknown"))
        elements, image = len(ds), "Rows" in ds and "Columns" in ds
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    except RadflowError:
        raise  # the store's own (StorageError, ObjectMissing)
    except InvalidDicomError as exc:
        raise NotDicom(f'"{ref.uri}" is not a DICOM file: no DICM preamble') from exc
    except Exception as exc:  # whatever the parser raises is this object's fault, never the run's
        raise parser_error(exc, f'"{ref.uri}" has an unreadable header') from exc
    try:
        study = _uid(tags, "StudyInstanceUID", ref.uri)
        series = _uid(tags, "SeriesInstanceUID", ref.uri)
        sop = _uid(tags, "SOPInstanceUID", ref.uri)
        if not image:
            raise UnsupportedImage(f'"{ref.uri}" holds no image ({sop_class}): no Rows/Columns')
    except RadflowError as exc:
        # pydicom stops quietly at the end of the data: a cut file, not a UID-less one
        cut = isinstance(exc, CorruptDicom) or elements == 0 or "Image Storage" in sop_class
        if at_end and cut:
            found = f"{elements} data elements" if elements else "no data elements"
            what = str(exc.args[0]).removeprefix(f'"{ref.uri}" ')
            raise CorruptDicom(
                f'"{ref.uri}" has an unreadable header: truncated after {ref.size} bytes '
                f"({found} after the file meta header; {what})"
            ) from exc
        raise
    number = _int(tags["InstanceNumber"], None)
    frames = max(1, _int(tags["NumberOfFrames"], 1) or 1)
    header = {k: tags[k] for k in _CONTEXT_TAGS}
    return Instance(
        ref,
        study,
        series,
        sop,
        header["Modality"],
        number,
        frames,
        header,
        _frame_bytes(tags),
        syntax,
    )


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
