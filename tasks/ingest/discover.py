"""Find studies: read DICOM headers only, group instances by StudyInstanceUID and series, and
check that each study holds one patient and each SOPInstanceUID one instance."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from tasks.core.errors import (
    CorruptDicom,
    IdentityConflict,
    NotDicom,
    RadflowError,
    StorageError,
    SymlinkEscape,
    UnsupportedImage,
    parser_error,
)
from tasks.core.schema import ErrorRecord
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

# Who the images are of, compared between the instances of a study: kept only as keyed hashes
# under a random key of this process (never written out), so no identifier is held in clear.
_IDENTITY_TAGS = ("PatientID", "PatientName", "PatientBirthDate")
_IDENTITY_KEY = secrets.token_bytes(32)

_IMAGE_TAGS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")
_READ = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    *_IMAGE_TAGS,
    *_CONTEXT_TAGS,
    *_IDENTITY_TAGS,
)


def _identity_digest(keyword: str, value: object) -> str:
    """A keyed hash of one identity attribute, "" when it is empty. PatientName is compared
    case-insensitively, without padding or empty trailing components (PS3.5 6.2: "DOE^JANE"
    and "doe^jane^^" are one name)."""
    text = " ".join(str(value or "").replace("\0", " ").split())
    if keyword == "PatientName":
        groups = ("^".join(c.strip() for c in g.split("^")).rstrip("^") for g in text.split("="))
        text = "=".join(groups).rstrip("=").upper()
    if not text:
        return ""
    digest = hmac.new(_IDENTITY_KEY, f"{keyword}\0{text}".encode("utf-8", "replace"), "sha256")
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Instance:
    """One readable DICOM image object (its header, never its pixels) and, when the source
    holds copies of it (same SOPInstanceUID, study and series), those copies in key order."""

    ref: ObjectRef
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str
    instance_number: int | None
    frames: int
    header: dict[str, str]  # the raw _CONTEXT_TAGS values; de-identified by tasks.ingest.context
    frame_bytes: int = 0  # decoded bytes of one frame, as the header claims (decode budget)
    transfer_syntax: str = ""  # (0002,0010), "" when the file has none
    patient: tuple[str, ...] = ("", "", "")  # _identity_digest of each of _IDENTITY_TAGS
    alternates: tuple[Instance, ...] = ()  # other copies, tried when this one does not render

    @property
    def copies(self) -> tuple[Instance, ...]:
        """This copy first, then the alternates."""
        return (self, *self.alternates)


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
    def objects(self) -> list[ObjectRef]:
        """Every input object of the study: each instance's copies included."""
        return [copy.ref for inst in self.instances for copy in inst.copies]

    @property
    def fingerprint(self) -> str:
        """Hash of the input objects (key, size, version): a rerun skips the study on a match."""
        h = hashlib.sha256()
        for ref in sorted(self.objects, key=lambda r: r.key):
            h.update(f"{ref.key}\0{ref.size}\0{ref.version}\n".encode())
        return h.hexdigest()


@dataclass
class Inventory:
    studies: list[Study]
    errors: list[ErrorRecord]
    header_reads: int = 0  # objects whose header was read (or tried) to find the studies


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
        _convert_all(ds, ref.uri)  # the parser's work, done now: see its docstring
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    except RadflowError:
        raise  # the store's own (StorageError, ObjectMissing), or nesting refused
    except InvalidDicomError as exc:
        raise NotDicom(f'"{ref.uri}" is not a DICOM file: no DICM preamble') from exc
    except Exception as exc:  # whatever the parser raises is this object's fault, never the run's
        raise parser_error(exc, f'"{ref.uri}" has an unreadable header') from exc
    # Every value is converted: from here on it is radflow's code, and its errors are bugs.
    tags = {k: str(ds.get(k, "") or "") for k in _READ}
    uid = ds.get("SOPClassUID")
    sop_class = str(getattr(uid, "name", tags["SOPClassUID"] or "unknown"))
    elements, image = len(ds), "Rows" in ds and "Columns" in ds
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
        patient=tuple(_identity_digest(k, tags[k]) for k in _IDENTITY_TAGS),
    )


def _by(instances: Iterable[Instance], key: Any) -> dict[str, list[Instance]]:
    out: dict[str, list[Instance]] = {}
    for inst in instances:
        out.setdefault(key(inst), []).append(inst)
    return out


def _conflict(inst: Instance, reason: str) -> ErrorRecord:
    exc = IdentityConflict(f'"{inst.ref.uri}": {reason}')
    return ErrorRecord(
        source=inst.ref.uri,
        reason=str(exc),
        kind=exc.kind,
        stage="discover",
        study_instance_uid=inst.study_instance_uid,
    )


def _one_place(copies: list[Instance]) -> list[ErrorRecord]:
    """Error records for every copy of an SOPInstanceUID found in two studies or series (they
    cannot all be right); none when all copies are in one series."""

    def place(i: Instance) -> tuple[str, str]:
        return i.study_instance_uid, i.series_instance_uid

    if len({place(i) for i in copies}) == 1:
        return []
    records = []
    for inst in copies:
        other = next(o for o in copies if place(o) != place(inst))
        where = (
            f"study {other.study_instance_uid}"
            if other.study_instance_uid != inst.study_instance_uid
            else f"series {other.series_instance_uid} of the same study"
        )
        records.append(
            _conflict(
                inst,
                f"SOPInstanceUID {inst.sop_instance_uid} is also in {where} "
                f'("{other.ref.uri}"): not read, the copies contradict each other',
            )
        )
    return records


def _one_patient(uid: str, members: list[Instance]) -> tuple[list[Instance], list[ErrorRecord]]:
    """The instances of study ``uid`` that agree on the patient, and error records for the
    others. PatientID, then PatientName, then PatientBirthDate: among the instances that
    agree so far, the value held by a strict majority of those that carry one (counted by
    SOPInstanceUID: copies count once) is the study's, and an instance with another value is
    an error record; an empty value agrees with any. When values differ and none holds a
    strict majority, every instance of the study is an error record. Messages name the
    attributes, never their values."""
    kept, rejected = members, []
    study_values: list[str] = []  # per attribute, the study's value ("" when none)
    for f, tag in enumerate(_IDENTITY_TAGS):
        holders: dict[str, set[str]] = {}  # value → the SOPInstanceUIDs holding it
        for inst in kept:
            if inst.patient[f]:
                holders.setdefault(inst.patient[f], set()).add(inst.sop_instance_uid)
        value = max(holders, key=lambda v: len(holders[v]), default="")
        if len(holders) > 1 and 2 * len(holders[value]) <= len(set().union(*holders.values())):
            reason = (
                f"StudyInstanceUID {uid} holds instances of {len(holders)} different patients "
                f"({tag} differs): not read"
            )
            return [], [_conflict(inst, reason) for inst in members]
        study_values.append(value)
        rejected += [i for i in kept if i.patient[f] not in ("", value)]
        kept = [i for i in kept if i.patient[f] in ("", value)]
    others = len({i.sop_instance_uid for i in kept})
    records = []
    for inst in rejected:
        tags = [t for t, v, own in zip(_IDENTITY_TAGS, study_values, inst.patient, strict=True)
                if own and v and own != v]  # fmt: skip
        records.append(
            _conflict(
                inst,
                f"{', '.join(tags)} {'differs' if len(tags) == 1 else 'differ'} from the "
                f"{others} other instance{'s' if others != 1 else ''} of StudyInstanceUID {uid}: "
                "not read (the study is read without it)",
            )
        )
    return kept, records


def group_instances(instances: Iterable[Instance]) -> tuple[list[Study], list[ErrorRecord]]:
    """Group by StudyInstanceUID, then check identity (each rule's records name the conflict):
    an SOPInstanceUID in two studies or series fails every copy; the instances of a study
    must agree on the patient (see :func:`_one_patient`); copies of one instance in one series
    become one :class:`Instance`, the first by key with the others as ``alternates``."""
    ordered = sorted(instances, key=lambda i: i.ref.key)
    errors: list[ErrorRecord] = []
    placed: list[Instance] = []
    for copies in _by(ordered, lambda i: i.sop_instance_uid).values():
        records = _one_place(copies)
        errors += records
        placed += [] if records else copies
    studies = []
    for uid, members in _by(placed, lambda i: i.study_instance_uid).items():
        kept, records = _one_patient(uid, sorted(members, key=lambda i: i.ref.key))
        errors += records
        if not kept:
            continue
        instances = [
            replace(first, alternates=tuple(rest))
            for first, *rest in _by(kept, lambda i: i.sop_instance_uid).values()
        ]
        instances.sort(key=lambda i: (i.series_instance_uid, i.instance_number or 0, i.ref.key))
        studies.append(Study(uid, instances))
    return sorted(studies, key=lambda s: s.study_instance_uid), errors


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
    reads = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="header") as pool:
        for item in pool.map(lambda ref: _header_or_error(store, ref), store.list()):
            reads += 1
            if isinstance(item, Instance):
                instances.append(item)
            else:
                errors.append(item)
    studies, conflicts = group_instances(instances)
    logger.info(
        "found %d studies in %d instances, %d errors",
        len(studies),
        len(instances),
        len(errors) + len(conflicts),
    )
    return Inventory(studies, errors + conflicts, reads)
