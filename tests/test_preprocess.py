"""Preprocessing against pydicom's reference pipeline, on real files by name."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from simulator.samples import synthetic_ct
from tasks.config import PreprocessConfig, WindowName
from tasks.errors import CorruptDicom, NotDicom, PhiRisk, UnsupportedImage
from tasks.preprocess import prepare, render, window_to_grey


def _file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} missing: pydicom-data must be installed"
    return path


def _reference(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's modality LUT + first VOI, scaled linearly from its output range to 0..255,
    inverted for MONOCHROME1 (PS3.3 C.11.2.1)."""
    arr = apply_modality_lut(ds.pixel_array, ds)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        grey = apply_voi_lut(arr, ds, index=0).astype(np.float64) * 255 / (2**bits - 1)
    else:
        y = apply_voi_lut(arr, ds, index=0).astype(np.float64)
        lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0).astype(np.float64)
        grey = (y - lo) * 255 / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return grey


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "693_UNCI.dcm",
        "MR2_UNCI.dcm",
        "RG1_UNCR.dcm",
        "RG3_UNCI.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "vlut_04.dcm",
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
    ],
)
def test_header_window_matches_pydicom_reference(name):
    ds = pydicom.dcmread(_file(name))
    if "WindowCenter" not in ds and "VOILUTSequence" not in ds:
        pytest.skip(f"{name} has no header window")
    out, label, _ = render(ds, WindowName.HEADER)
    ref = _reference(ds)
    assert out.shape == ref.shape
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0, label


def test_monochrome1_is_inverted_after_voi():
    ds = pydicom.dcmread(_file("RG1_UNCR.dcm"))
    mono1, _, _ = render(ds, WindowName.HEADER)
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2, _, _ = render(ds, WindowName.HEADER)
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_ct_preset_applies_hounsfield_window():
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    out, label, _ = render(ds, WindowName.LUNG)
    hu = apply_modality_lut(ds.pixel_array, ds)
    expected = window_to_grey(hu, -600, 1500)
    assert label.startswith("lung")
    assert np.abs(out - expected).max() <= 1.0


@pytest.mark.parametrize(
    "name",
    [
        "US1_UNCR.dcm",
        "US1_J2KI.dcm",
        "OBXXXX1A.dcm",
        "SC_rgb_16bit.dcm",
        "SC_ybr_full_uncompressed.dcm",
    ],
)
def test_colour_images_become_8_bit_rgb(name):
    out, label, _ = render(pydicom.dcmread(_file(name)))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3
    assert label == "colour" and out.std() > 5


def test_ybr_and_rgb_versions_of_one_image_agree():
    rgb, _, _ = render(pydicom.dcmread(_file("US1_UNCR.dcm")))
    ybr, _, _ = render(pydicom.dcmread(_file("US1_J2KR.dcm")))
    assert np.abs(rgb.astype(int) - ybr.astype(int)).mean() < 2


def test_multiframe_decodes_the_middle_frame():
    ds = pydicom.dcmread(_file("emri_small.dcm"))
    out, _, frame = render(ds)
    assert frame == 5
    assert out.shape == (64, 64)


@pytest.mark.parametrize(
    "name",
    [
        "693_J2KR.dcm",
        "MR2_J2KI.dcm",
        "RG1_J2KI.dcm",
        "JPEG-LL.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_RLE.dcm",
        "JPGExtended.dcm",
    ],
)
def test_compressed_transfer_syntaxes_decode(name, tmp_path):
    image = prepare(_file(name), PreprocessConfig(max_edge=512))
    img = Image.open(io.BytesIO(image.png))
    assert img.format == "PNG" and max(img.size) <= 512
    assert (image.width, image.height) == img.size


def test_resize_fits_long_edge_and_zero_keeps_size():
    path = _file("RG1_UNCR.dcm")
    small = prepare(path, PreprocessConfig(max_edge=300))
    assert max(small.width, small.height) == 300
    full = prepare(path, PreprocessConfig(max_edge=0))
    assert (full.width, full.height) == (1841, 1955)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "not dicom.dcm"
    bad.write_text("hello")
    with pytest.raises(NotDicom, match="not dicom.dcm"):
        prepare(str(bad), PreprocessConfig())


def test_blank_image_is_an_error_not_a_silent_blank(tmp_path):
    path = synthetic_ct(tmp_path / "a.dcm", lesion=False, seed=1)
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, np.uint16).tobytes()
    with pytest.raises(UnsupportedImage, match="blank"):
        render(ds)
    # non-constant data that the chosen window flattens is an error too
    ds.PixelData = (np.arange(ds.Rows * ds.Columns, dtype=np.uint16) % 7).tobytes()
    with pytest.raises(CorruptDicom, match="blank"):
        render(ds, WindowName.BONE)


def test_burned_in_annotation_is_refused_by_default(tmp_path):
    path = synthetic_ct(tmp_path / "b.dcm", lesion=True, seed=2, phi={"BurnedInAnnotation": "YES"})
    with pytest.raises(PhiRisk, match="BurnedInAnnotation"):
        prepare(str(path), PreprocessConfig())
    assert prepare(str(path), PreprocessConfig(burned_in="allow")).width == 256


def test_no_pixel_data_is_unsupported(tmp_path):
    path = synthetic_ct(tmp_path / "c.dcm", lesion=False, seed=3)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match="no pixel data"):
        render(ds)
