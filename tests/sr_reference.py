"""The reference for radflow's SR: highdicom's ``ComprehensiveSR`` constructor called exactly as
``build_sr`` called it until 2026-12-04, SR cases that cover ``build_sr``'s branches, and a
recursive element-by-element comparison of two datasets (used by tests/test_reports.py and
benchmarks/sr.py)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import pydicom
from pydicom.data import get_testdata_file

from tasks.core.schema import ImageInfo, Impression, ModelReading, Report, Urgency
from tasks.reports.sr import evidence_dataset, sr_uids
from tests.helpers import make_report, panel_readings

__all__ = ["TIME_DEPENDENT", "SrCase", "differences", "highdicom_sr", "sr_cases"]

# What differs between two builds of the same SR a moment apart, as paths: highdicom stamps
# "now" in these, top level and the last Contributing Equipment item (highdicom itself). No UID
# of the SR is generated fresh: series, instance and device UIDs come from the report.
TIME_DEPENDENT = frozenset(
    {
        "ContentDate",
        "ContentTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContributingEquipmentSequence[-1].ContributionDateTime",
    }
)
_ONE_COMPONENT_NAME = r'The string ".*" is unlikely to represent the intended person name'


def highdicom_sr(
    report: Report,
    root: pydicom.Dataset,
    evidence: Sequence[pydicom.Dataset],
    previous: Sequence[pydicom.Dataset] = (),
    instance_number: int = 1,
) -> hd.sr.ComprehensiveSR:
    """The SR document of the content tree ``root`` as highdicom's constructor builds it,
    with the arguments ``build_sr`` passed it before 2026-12-04."""
    series_uid, sop_uid = sr_uids(report)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _ONE_COMPONENT_NAME, UserWarning, r"highdicom\.")
        return hd.sr.ComprehensiveSR(
            evidence=list(evidence),
            content=root,
            series_instance_uid=series_uid,
            series_number=990,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            previous_versions=list(previous) or None,
            manufacturer="radflow",
            manufacturer_model_name="radflow",
            software_versions=report.radflow_version,
            series_description="radflow AI screening (preliminary)",
            is_complete=False,
            is_final=False,
            is_verified=False,
            specific_character_set="ISO_IR 192",
        )


def differences(
    a: pydicom.Dataset,
    b: pydicom.Dataset,
    path: str = "",
    file_meta: bool = True,
    types: bool = True,
) -> Iterator[str]:
    """Every difference between ``a`` and ``b``: tags present in one only, VRs, values, nested
    sequence lengths and items (recursively; a sequence's last item is named ``[-1]``), and at
    the top (unless not ``file_meta``) the file meta and preamble; the ``TIME_DEPENDENT`` paths
    are compared for presence and VR only. Without ``types`` a value is compared as text (a
    file read back has str where the builder set a DT)."""
    if not path and file_meta:
        if getattr(a, "preamble", None) != getattr(b, "preamble", None):
            yield "preamble"
        meta_a, meta_b = getattr(a, "file_meta", None), getattr(b, "file_meta", None)
        if (meta_a is None) != (meta_b is None):
            yield "file_meta present in one only"
        elif meta_a is not None:
            yield from differences(meta_a, meta_b, "file_meta.")
    tags_a, tags_b = set(a.keys()), set(b.keys())
    for tag in sorted(tags_a ^ tags_b):
        yield f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}: in one only"
    for tag in sorted(tags_a & tags_b):
        ea, eb = a[tag], b[tag]
        where = f"{path}{ea.keyword or tag}"
        if ea.VR != eb.VR:
            yield f"{where}: VR {ea.VR} != {eb.VR}"
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                yield f"{where}: {len(ea.value)} items != {len(eb.value)}"
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=False)):
                last = i == len(ea.value) - 1 == len(eb.value) - 1
                yield from differences(ia, ib, f"{where}[{-1 if last else i}].", types=types)
        elif where in TIME_DEPENDENT:
            continue
        elif (
            (type(ea.value) is not type(eb.value) or ea.value != eb.value)
            if types
            else (str(ea.value) != str(eb.value))
        ):
            yield f"{where}: {ea.value!r} != {eb.value!r}"


@dataclass
class SrCase:
    """One SR to build: a report, its evidence and the earlier versions it supersedes."""

    name: str
    report: Report
    evidence: list[pydicom.Dataset]
    previous: list[pydicom.Dataset] = field(default_factory=list)
    instance_number: int = 1


def _header(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def _image(ds: pydicom.Dataset, frame: int | None = None) -> ImageInfo:
    return ImageInfo(
        sop_instance_uid=ds.SOPInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        source="source.dcm",
        sha256="ab" * 32,
        width=128,
        height=128,
        window="default",
        frame=frame,
        modality=str(ds.get("Modality", "")) or None,
    )


def _impression(text: str, language: str) -> Impression:
    return Impression(
        ok=True,
        text=text,
        language=language,
        model="claude",
        provider="anthropic",
        model_id="claude-sonnet-4-6",
        prompt_version="impression-v1-x",
    )


def _failed_readings() -> list[ModelReading]:
    return [
        ModelReading(model=m, provider=p, model_id=m, ok=False, error="timed out")
        for m, p in (("gpt-4o", "openai"), ("claude", "anthropic"))
    ]


def _previous_sr(study_uid: str, series_uid: str, i: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID = pydicom.uid.ComprehensiveSRStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["previous", study_uid, str(i)])
    return ds


def sr_cases() -> list[SrCase]:
    """SRs covering build_sr's branches: abnormal or not or no reading, urgency, score,
    impression, recommended exams, review reasons, multi-frame evidence read at one frame,
    several evidence objects (one of another study, one twice), predecessors, a one-component
    PatientName, Korean and English, text over 1,024 characters, evidence with and without
    the acquisition equipment highdicom records (and with a value it refuses there)."""
    ct, mr, us = _header("CT_small.dcm"), _header("MR_small.dcm"), _header("US1_J2KR.dcm")
    emri = _header("emri_small.dcm")  # Enhanced MR, 10 frames, AcquisitionDateTime
    ct_ev = evidence_dataset(ct, "ct.dcm")
    long_text = "Nodules in the right upper lobe, " * 60  # > 1,024, cut inside a word
    # a second CT instance of the same study, in another series, without a manufacturer
    ct2 = copy.deepcopy(ct)
    ct2.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["ct2-series"])
    ct2.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["ct2-instance"])
    del ct2.Manufacturer
    ct2_ev = evidence_dataset(ct2, "ct2.dcm")
    emri_ev = evidence_dataset(emri, "emri.dcm")
    emri_made = copy.deepcopy(emri_ev)
    emri_made.Manufacturer = "ACME"  # then highdicom records its acquisition equipment
    one_name = copy.deepcopy(ct_ev)
    one_name.PatientName = "CQ500-CT-310"  # as in pydicom-data's 693_J2KR.dcm
    long_station = copy.deepcopy(ct_ev)
    # StationName over SH's 16 characters, as a source header may have it: highdicom's
    # acquisition equipment item is then left out
    long_station.add(
        pydicom.DataElement(0x00081010, "SH", "S" * 20, validation_mode=pydicom.config.IGNORE)
    )
    agree = panel_readings(disagree=False)
    agree[0].recommended_exams = [long_text]
    agree[1].findings = [long_text]
    cases = [
        SrCase(
            "disagree-en",
            make_report(ct.StudyInstanceUID, panel_readings(), images=[_image(ct)]),
            [ct_ev],
        ),
        SrCase(
            "agree-ko-impression",
            make_report(
                ct.StudyInstanceUID,
                agree,
                language="ko",
                images=[_image(ct)],
                impression=_impression("두 모델 모두 우상엽 결절을 보고했습니다. " * 80, "ko"),
            ),
            [ct_ev],
        ),
        SrCase(
            "no-reading-no-images",
            make_report(mr.StudyInstanceUID, _failed_readings(), images=[]),
            [evidence_dataset(mr, "mr.dcm")],
        ),
        SrCase(
            "multi-frame-at-frame-3",
            make_report(emri.StudyInstanceUID, panel_readings(), images=[_image(emri, 3)]),
            [emri_made],
        ),
        SrCase(
            "multi-frame-no-frame-no-manufacturer",
            make_report(emri.StudyInstanceUID, panel_readings(), images=[_image(emri)]),
            [emri_ev],
        ),
        SrCase(
            "several-evidence-one-of-another-study",
            make_report(
                ct.StudyInstanceUID,
                panel_readings(),
                images=[_image(ct), _image(ct2), _image(us)],
            ),
            [ct_ev, ct2_ev, evidence_dataset(us, "us.dcm"), ct_ev],
        ),
        SrCase(
            "predecessors-instance-3",
            make_report(ct.StudyInstanceUID, agree, images=[_image(ct)], language="en"),
            [ct_ev],
            previous=[
                _previous_sr(ct.StudyInstanceUID, "1.2.3.990", 1),
                _previous_sr(ct.StudyInstanceUID, "1.2.3.990", 2),
                _previous_sr(ct.StudyInstanceUID, "1.2.3.991", 3),
            ],
            instance_number=3,
        ),
        SrCase(
            "one-component-name",
            make_report(ct.StudyInstanceUID, panel_readings(), images=[_image(ct)]),
            [one_name],
        ),
        SrCase(
            "station-name-too-long",
            make_report(ct.StudyInstanceUID, panel_readings(), images=[_image(ct)]),
            [long_station],
        ),
        SrCase(
            "immediate-ko",
            make_report(
                us.StudyInstanceUID,
                [
                    ModelReading(
                        model="gpt-4o",
                        provider="openai",
                        model_id="gpt-4o",
                        ok=True,
                        abnormal=True,
                        urgency=Urgency.IMMEDIATE,
                        findings=["Free fluid"],
                    ),
                    *_failed_readings()[1:],
                ],
                language="ko",
                images=[_image(us)],
            ),
            [evidence_dataset(us, "us.dcm")],
        ),
    ]
    return cases
