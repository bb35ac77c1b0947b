"""Sample studies for the demo, tests and benchmarks: synthetic CT studies with or without a
bright lesion, plus real files from the ``pydicom-data`` package (no network needed)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["REAL_SAMPLES", "build_sample_folder", "synthetic_ct"]

# name in pydicom-data → what it shows (a CT, an MR, a MONOCHROME1 CR, a colour ultrasound)
REAL_SAMPLES = {
    "693_J2KR.dcm": "CT, JPEG 2000 lossless",
    "MR2_J2KI.dcm": "MR 1024², JPEG 2000",
    "RG1_J2KI.dcm": "CR MONOCHROME1 1955×1841, JPEG 2000",
    "US1_J2KI.dcm": "US colour (YBR_ICT), JPEG 2000",
}


def synthetic_ct(
    path: str | Path,
    *,
    lesion: bool,
    seed: int,
    size: int = 256,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance: int = 1,
    phi: dict[str, str] | None = None,
) -> Path:
    """Write a CT slice: a soft-tissue body with two lungs and, if ``lesion``, a bright
    (≈ 300 HU) round lesion. Identifying tags are filled with synthetic values: one patient
    per study (slices given the same ``study_uid`` are one patient's), else per ``seed``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    hu = np.full((size, size), -1000.0)
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    hu[body] = 40
    for cx in (0.33, 0.67):
        hu[((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1] = -800
    if lesion:
        cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.6)
        r = rng.uniform(0.05, 0.09)
        hu[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 300
    hu += rng.normal(0, 8, hu.shape)
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path), str(seed), "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=[str(seed), "study"])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[str(seed), "series"])
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance
    patient = int(hashlib.sha256(study_uid.encode()).hexdigest(), 16) % 10**4 if study_uid else seed
    ds.PatientName = f"SYNTHETIC^PATIENT^{patient}"
    ds.PatientID = f"SYN-{patient:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F" if seed % 2 else "M"
    ds.PatientAge = f"{40 + seed % 40:03d}Y"
    ds.StudyDate = "20260101"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.StudyDescription = "SYNTHETIC CHEST CT"
    for keyword, value in (phi or {}).items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 50
    ds.WindowWidth = 350
    ds.PixelData = stored.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_sample_folder(
    dest: str | Path, *, synthetic: int = 6, real: bool = True, junk: bool = True
) -> dict[str, str]:
    """Fill ``dest`` with sample studies; returns {relative path: what it is}."""
    from pydicom.data import get_testdata_file

    dest = Path(dest)
    made: dict[str, str] = {}
    if real:
        for name, what in REAL_SAMPLES.items():
            src = get_testdata_file(name, download=False)
            if src is None:
                raise FileNotFoundError(f'"{name}" is missing: install the pydicom-data package')
            target = dest / "real" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            made[target.relative_to(dest).as_posix()] = what
    for i in range(synthetic):
        lesion = i % 2 == 0
        rel = f"synthetic/환자 {i:02d}/{'lesion' if lesion else 'normal'} slice.dcm"
        synthetic_ct(dest / rel, lesion=lesion, seed=1000 + i)
        made[rel] = f"synthetic CT {'with' if lesion else 'without'} lesion"
    if junk:
        (dest / "notes.txt").write_text("not a DICOM file\n")
        made["notes.txt"] = "a text file (expected: error record)"
    return made
