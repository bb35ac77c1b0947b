"""report.sr.dcm: the consensus as a DICOM Comprehensive SR in the source study, referencing
the key images that were read and naming the AI models as device observers; the content tree
of highdicom's content items, the document around it from tasks/reports/srdocument.py."""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from tasks.core.errors import CorruptDicom, RadflowError, parser_error
from tasks.core.schema import Consensus, Report
from tasks.core.words import ABNORMAL_CODES, LANGUAGE_TAGS, URGENCY_MEANINGS, YES_NO_CODES
from tasks.pacs.version import report_version
from tasks.reports.srdocument import EVIDENCE_REQUIRED, sr_document

if TYPE_CHECKING:  # annotations only: no import cycle with tasks.storage
    from tasks.storage import Store

__all__ = [
    "build_sr",
    "content_tree",
    "device_uid",
    "evidence_dataset",
    "read_evidence",
    "sr_bytes",
    "sr_series_uid",
    "sr_uids",
    "warm_up",
]

logger = logging.getLogger(__name__)

# Private coding scheme (PS3.16 8.2: designators starting with "99" are local) for what no
# standard code names: urgency levels and the review flag.
SCHEME = "99RADFLOW"
URGENCY = Code("urgency", SCHEME, "Urgency")
URGENCY_CODES = {u: Code(u.value, SCHEME, meaning) for u, meaning in URGENCY_MEANINGS.items()}
NEEDS_REVIEW = Code("needs_review", SCHEME, "Needs review")
AGREEMENT = Code("agreement", SCHEME, "Panel agreement")
SCORE = Code("abnormal_score", SCHEME, "Weighted abnormal vote share")
NO_UNITS = Code("1", "UCUM", "no units")
# SNOMED CT (tasks.core.words): the conclusion abnormal/normal and the review flag's yes/no.
ABNORMAL = {flag: Code(code, "SCT", meaning) for flag, (code, meaning) in ABNORMAL_CODES.items()}
YES_NO = {flag: Code(code, "SCT", meaning) for flag, (code, meaning) in YES_NO_CODES.items()}
LANGUAGES = {
    language.value: hd.sr.CodedConcept(tag, "RFC5646", name)
    for language, (tag, name) in LANGUAGE_TAGS.items()
}
SERIES_NUMBER = 990
SERIES_DESCRIPTION = "radflow AI screening (preliminary)"
CHARACTER_SET = "ISO_IR 192"  # UTF-8: Korean reports, any patient name
# Type 2 attributes the SR copies from the first evidence dataset: present, maybe empty.
_TYPE2 = (*EVIDENCE_REQUIRED, "ReferringPhysicianName")


def device_uid(name: str, model_id: str) -> str:
    """A stable Device Observer UID per panel model (same model → same UID across reports)."""
    return generate_uid(entropy_srcs=["radflow-device", name, model_id])


def sr_series_uid(study_instance_uid: str) -> str:
    """The SeriesInstanceUID of radflow's SR series in a study (one per study)."""
    return generate_uid(entropy_srcs=["radflow-sr-series", study_instance_uid])


def sr_uids(report: Report) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID): one radflow SR series per study; one instance per
    report version (what the report says): a rerun or retry that says the same makes the same
    SR, and a PACS stores it once; one that says something else makes a new instance."""
    uid = report.study_instance_uid
    sop = generate_uid(entropy_srcs=["radflow-sr", uid, report_version(report)])
    return sr_series_uid(uid), sop


# What the SR takes from its evidence: the patient, clinical-trial and study-level elements
# (groups 0008/0010/0012/0020/0032, of which the SR copies the Patient and Study modules)
# and each instance's identity. Acquisition and pixel-description groups, private elements
# and the rest stay behind: the headers are kept per study until its report is written.
_EVIDENCE_GROUPS = frozenset({0x0008, 0x0010, 0x0012, 0x0020, 0x0032})


def evidence_dataset(ds: pydicom.Dataset, source: str) -> pydicom.Dataset:
    """What the SR needs of a source header (read with ``stop_before_pixels``), copied;
    missing Type 2 patient/study attributes are added empty."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(keyword):
            raise CorruptDicom(f'"{source}" has no {keyword}: it cannot be SR evidence')
    out = pydicom.Dataset()
    for element in ds:
        if element.tag.group in _EVIDENCE_GROUPS and not element.tag.is_private:
            out.add(copy.deepcopy(element))
    if "NumberOfFrames" in ds:  # which frame of a multi-frame image was read
        out.NumberOfFrames = ds.NumberOfFrames
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def read_evidence(store: Store, objects: Sequence[tuple[str, str]]) -> list[pydicom.Dataset]:
    """The headers (``stop_before_pixels``, through ``open_header``: S3 and DICOMweb fetch no
    pixels) of the key images' source objects, given as (key, uri) pairs: the SR's evidence.
    They stay in radflow and DEST, never reach a model."""
    out = []
    for key, uri in objects:
        try:
            with store.open_header(key) as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except RadflowError:
            raise  # the store's
        except Exception as exc:  # the parser's, for this object (see parser_error)
            raise parser_error(exc, f'"{uri}" has an unreadable header for the SR') from exc
        out.append(evidence_dataset(ds, uri))
    return out


def _text(name: Code, value: str, rel: str = "CONTAINS") -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024] or "-", relationship_type=rel)


def _code(name: Code, value: Code) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(name=name, value=value, relationship_type="CONTAINS")


def _num(name: Code, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=NO_UNITS, relationship_type="CONTAINS")


def _section(name: Code, items: list) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(name=name, relationship_type="CONTAINS")
    section.ContentSequence = items
    return section


def content_tree(report: Report, by_sop: dict[str, pydicom.Dataset]) -> hd.sr.ContainerContentItem:
    """The root container, structured after TID 2000 (Basic Diagnostic Imaging Report):
    language, one device observer context (TID 1002/1004) per panel model, then sections
    Findings (TEXT per merged finding with its supporting models; IMAGE per key image read,
    looked up by SOP Instance UID in ``by_sop``), Conclusions (CODE abnormal/normal, urgency,
    review flag; NUM agreement and score), Impressions (the model-written impression, if any)
    and Recommendations."""
    c = report.consensus
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    items: list = list(hd.sr.LanguageOfContentItemAndDescendants(LANGUAGES[report.language]))
    for r in report.readings:
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(r.model, r.model_id),
                name=r.model[:64],
                manufacturer_name=r.provider[:64],
                model_name=r.model_id[:64],
            ),
        )
        items.extend(observer)
    findings = [_text(codes.DCM.Finding, f"{f.text} [{', '.join(f.models)}]") for f in c.findings]
    for img in report.images:
        ds = by_sop.get(img.sop_instance_uid)
        if ds is None:
            raise ValueError(f"key image {img.sop_instance_uid} is not among the SR evidence")
        multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
        findings.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.SourceImage,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=img.frame + 1 if multi and img.frame is not None else None,
                relationship_type="CONTAINS",
            )
        )
    items.append(_section(codes.DCM.Findings, findings or [_text(codes.DCM.Finding, "none")]))
    items.append(_section(codes.DCM.Conclusions, _conclusions(c)))
    if report.impression is not None and report.impression.ok:
        imp = report.impression
        text = f"[model-written by {imp.model} ({imp.model_id})] {imp.text}"
        items.append(_section(codes.DCM.Impressions, [_text(codes.DCM.Impression, text)]))
    if c.recommended_exams:
        recs = [
            _text(codes.DCM.Recommendation, f"{e.text} [{', '.join(e.models)}]")
            for e in c.recommended_exams
        ]
        items.append(_section(codes.DCM.Recommendations, recs))
    root.ContentSequence = items
    return root


def _conclusions(c: Consensus) -> list:
    """The Conclusions section's items: abnormal/normal, urgency, review flag and reasons,
    agreement and score."""
    out: list = []
    if c.abnormal is not None:
        out.append(_code(codes.DCM.Conclusion, ABNORMAL[c.abnormal]))
    if c.urgency is not None:
        out.append(_code(URGENCY, URGENCY_CODES[c.urgency]))
    out.append(_code(NEEDS_REVIEW, YES_NO[c.needs_review]))
    out.extend(_text(codes.DCM.Conclusion, f"review: {reason}") for reason in c.review_reasons)
    out.append(_num(AGREEMENT, c.agreement))
    if c.score is not None:
        out.append(_num(SCORE, c.score))
    return out


def build_sr(
    report: Report,
    evidence: Sequence[pydicom.Dataset],
    previous: Sequence[pydicom.Dataset] = (),
    instance_number: int = 1,
) -> pydicom.Dataset:
    """The report as a Comprehensive SR in the source study (``content_tree`` in the document
    of ``sr_document``): preliminary, partial and unverified, AI output for review.
    ``evidence`` are the key images' source headers (``evidence_dataset``), the first of them
    giving the patient and study; ``previous`` are the earlier radflow SRs of the study it
    supersedes (Predecessor Documents Sequence, PS3.3 C.17.2.3). Element for element what
    highdicom's ``ComprehensiveSR`` constructor made of the same tree (checked by
    tests/test_reports.py::test_sr_equals_highdicoms_constructor), at a fraction of the CPU."""
    if not evidence:
        raise ValueError(f"study {report.study_instance_uid}: no evidence dataset for the SR")
    root = content_tree(report, {ds.SOPInstanceUID: ds for ds in evidence})
    series_uid, sop_uid = sr_uids(report)
    return sr_document(
        root,
        evidence,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        previous=previous,
        manufacturer="radflow",
        manufacturer_model_name="radflow",
        software_versions=report.radflow_version,
        series_description=SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
    )


def sr_bytes(sr: pydicom.Dataset) -> bytes:
    """The SR as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def warm_up() -> None:
    """Build and drop one SR document of a made-up instance, so that highdicom's tables of the
    standard (which modules an IOD has, the Patient and Study attributes to copy: ~0.3 s on an
    idle machine, once per process) are read now: in a thread while a run's first models are
    reading, or when `radflow serve` starts, not in a study's report."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in "123")
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.Modality = "CT"
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = [_text(codes.DCM.Finding, "warm-up")]
    sr_document(
        root,
        [evidence_dataset(ds, "warm-up")],
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="radflow",
        manufacturer_model_name="radflow",
        software_versions="warm-up",
        series_description=SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
    )
