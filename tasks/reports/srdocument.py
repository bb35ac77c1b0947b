"""The SR document around a content tree: the top-level modules of a Comprehensive SR (PS3.3
A.35.3) assembled directly as a pydicom Dataset, element for element what highdicom's
``ComprehensiveSR`` constructor makes, without its deep copy, re-parse and walks of the tree."""

from __future__ import annotations

import datetime
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import highdicom as hd
import pydicom
from highdicom._standard_utils import (  # the standard's tables highdicom copies modules by
    does_iod_have_pixel_data,
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom.datadict import tag_for_keyword
from pydicom.filewriter import write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ComprehensiveSRStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

__all__ = ["EVIDENCE_REQUIRED", "sr_document", "study_tags"]

logger = logging.getLogger(__name__)

# What highdicom's constructor writes as the creating implementation (PS3.10 7.1): the SR's
# file meta stays as it was when highdicom built the whole document.
_IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.9.7433.1.1")
_IMPLEMENTATION_VERSION = f"highdicom{hd.__version__}"
# What highdicom's constructor reads from the first evidence dataset and fails without
# (``evidence_dataset`` adds them empty where a source lacks them).
EVIDENCE_REQUIRED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


@lru_cache(maxsize=64)
def study_tags(sop_class_uid: str) -> tuple[int, ...]:
    """The root-level tags of the Patient and Study IE modules of the IOD of
    ``sop_class_uid`` (PS3.3 A.1.4): what an SR in the same study takes over from its evidence,
    from highdicom's tables of the standard, in the order highdicom copies them."""
    iod = get_sop_class_iod_map()[sop_class_uid]  # KeyError for an unknown SOP class, as before
    attributes = get_module_attribute_map()
    tags: list[int] = []
    for ie in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] != ie:
                continue
            for item in attributes[module["key"]]:
                if not item["path"]:
                    tags.append(tag_for_keyword(str(item["keyword"])))
    return tuple(tags)


@lru_cache(maxsize=64)
def _is_image(sop_class_uid: str) -> bool:
    """Whether the IOD of ``sop_class_uid`` has pixel data (highdicom's table walk, cached)."""
    return does_iod_have_pixel_data(sop_class_uid)


def _file_meta(sop_instance_uid: str) -> pydicom.dataset.FileMetaDataset:
    """File Meta Information (PS3.10 7.1) for Explicit VR Little Endian."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    with io.BytesIO() as fp:
        write_file_meta_info(fp, meta, enforce_standard=True)
        meta.FileMetaInformationGroupLength = len(fp.getvalue())
    return meta


def _references(groups: dict[tuple[str, str], list[pydicom.Dataset]]) -> list[pydicom.Dataset]:
    """Hierarchical SOP Instance Reference Macro items (PS3.3 C.17.2.1): per study, per series,
    the instances, in the order first seen."""
    studies: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for (study_uid, series_uid), instances in groups.items():
        series = pydicom.Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = instances
        studies[study_uid].append(series)
    out = []
    for study_uid, series_items in studies.items():
        item = pydicom.Dataset()
        item.StudyInstanceUID = study_uid
        item.ReferencedSeriesSequence = series_items
        out.append(item)
    return out


def _sop_reference(ds: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _evidence(
    evidence: Sequence[pydicom.Dataset], study_uid: str
) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    """(Current Requested Procedure Evidence, Pertinent Other Evidence) items (PS3.3
    C.17.2.3): every evidence instance once, by whether it is of the SR's study."""
    same: dict[tuple[str, str], list[pydicom.Dataset]] = defaultdict(list)
    other: dict[tuple[str, str], list[pydicom.Dataset]] = defaultdict(list)
    seen: set[str] = set()
    for ds in evidence:
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        group = same if ds.StudyInstanceUID == study_uid else other
        group[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(_sop_reference(ds))
    return _references(same), _references(other)


def _predecessors(previous: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Predecessor Documents Sequence items (PS3.3 C.17.2.3) of the earlier versions."""
    groups: dict[tuple[str, str], list[pydicom.Dataset]] = defaultdict(list)
    for ds in previous:
        groups[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(_sop_reference(ds))
    return _references(groups)


def _acquisition_equipment(source: pydicom.Dataset) -> hd.ContributingEquipment:
    """The source image's acquisition equipment, as highdicom's
    ``ContributingEquipment.for_image_acquisition`` makes it (without its uncached walk of the
    IOD tables, done once per SOP class by ``_is_image``)."""
    when = source.get("AcquisitionDateTime")
    date, clock = source.get("AcquisitionDate"), source.get("AcquisitionTime")
    if when is None and isinstance(date, datetime.date) and isinstance(clock, datetime.time):
        when = datetime.datetime.combine(date, clock)
    return hd.ContributingEquipment(
        manufacturer=source.Manufacturer,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=source.get("ManufacturerModelName"),
        software_versions=source.get("SoftwareVersions"),
        device_serial_number=source.get("DeviceSerialNumber"),
        institution_name=source.get("InstitutionName"),
        institutional_department_name=source.get("InstitutionalDepartmentName"),
        institution_address=source.get("InstitutionAddress"),
        station_name=source.get("StationName"),
        contribution_datetime=when,
        contribution_description="Acquisition equipment of the source image(s)",
    )


def _equipment(source: pydicom.Dataset, now: datetime.datetime) -> list[pydicom.Dataset]:
    """Contributing Equipment Sequence (PS3.3 C.12.1.1.9): the acquisition equipment of the
    first evidence image if its header names a manufacturer, then highdicom as the library
    that made the content items."""
    items: list[pydicom.Dataset] = []
    if _is_image(source.SOPClassUID) and source.get("Manufacturer"):
        try:
            items.append(_acquisition_equipment(source))
        except ValueError as exc:  # a value the LO/SH/ST/DT checks refuse: the item is left out
            logger.debug("no acquisition equipment item for the SR: %s", exc)
    library = hd.ContributingEquipment.for_highdicom()
    library.ContributionDateTime = pydicom.valuerep.DT(now)
    items.append(library)
    return items


def sr_document(
    content: pydicom.Dataset,
    evidence: Sequence[pydicom.Dataset],
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    previous: Sequence[pydicom.Dataset] = (),
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    series_description: str,
    specific_character_set: str,
) -> pydicom.Dataset:
    """A Comprehensive SR document (preliminary, partial, unverified) in the study of
    ``evidence[0]``, around the root ``content`` container: SOP Common, Patient and General
    Study (the Patient and Study IE modules of the first evidence instance, as they are), SR
    Document Series, General Equipment, SR Document General (evidence, predecessors, flags)
    and SR Document Content. The caller has checked that every image the content references is
    among ``evidence``. ContentDate/Time, InstanceCreationDate/Time and the highdicom item's
    ContributionDateTime are the time of the call."""
    if not evidence:
        raise ValueError("an SR needs at least one evidence dataset")
    for name, value in (
        ("manufacturer", manufacturer),
        ("manufacturer_model_name", manufacturer_model_name),
        ("software_versions", software_versions),
        ("series_description", series_description),
    ):
        if len(value) > 64 or "\\" in value:  # LO (PS3.5 6.2)
            raise ValueError(f'{name} "{value}" is not a DICOM LO (64 characters, no "\\")')
    if series_number < 1 or instance_number < 1:
        raise ValueError(f"series {series_number}, instance {instance_number}: not positive")
    source = evidence[0]
    now = datetime.datetime.now()
    ds = pydicom.Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = _file_meta(sop_instance_uid)
    ds.SpecificCharacterSet = specific_character_set
    # SR Document Series, General Equipment, SOP Common
    ds.SeriesInstanceUID = str(series_instance_uid)
    ds.SeriesNumber = series_number
    ds.Modality = "SR"
    ds.SeriesDescription = series_description
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    ds.SoftwareVersions = software_versions
    ds.SOPInstanceUID = str(sop_instance_uid)
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.InstanceNumber = instance_number
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    # SR Document General (PS3.3 C.17.2)
    ds.ContentDate = DA(now.date())
    ds.ContentTime = TM(now.time())
    ds.CompletionFlag = "PARTIAL"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY"
    current, other = _evidence(evidence, source.StudyInstanceUID)
    if current:
        ds.CurrentRequestedProcedureEvidenceSequence = current
    if other:
        ds.PertinentOtherEvidenceSequence = other
    if previous:
        ds.PredecessorDocumentsSequence = _predecessors(previous)
    ds.PerformedProcedureCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = []
    # SR Document Content (PS3.3 C.17.3): the root container's own elements
    for tag, element in content.items():
        ds[tag] = element
    # Patient and General Study: the source's elements; Type 2 ones present even if empty
    ds.ReferringPhysicianName = None
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    for tag in study_tags(source.SOPClassUID):
        if tag in source:
            ds.add(source[tag])
    for keyword in EVIDENCE_REQUIRED:
        if keyword not in ds:
            raise AttributeError(f"evidence {source.SOPInstanceUID} has no {keyword}")
    ds.ContributingEquipmentSequence = _equipment(source, now)
    return ds
