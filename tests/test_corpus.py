"""Every file of pydicom's bundled test files and of ``pydicom-data`` renders or fails with one
line naming it and the reason; grey levels, colour and key images match the references."""

from __future__ import annotations

import io
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from tasks.core.config import PreprocessConfig, WindowName
from tasks.core.errors import RadflowError, UnsupportedImage
from tasks.imaging.preprocess import load, prepare_all, render, render_frames, window_to_grey

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
PYDICOM_DATA = Path(data_store.__file__).parent / "data"
CORPUS = sorted(p for root in (PYDICOM_FILES, PYDICOM_DATA) for p in root.rglob("*") if p.is_file())
CORPUS = [p for p in CORPUS if p.suffix not in (".py", ".pyc", ".json", ".gz", ".bz2", ".xz")]

# Image files that must fail, with the kind of error and a word of the reason.
KNOWN_BAD = {
    "JPEG-lossy.dcm": ("CorruptDicom", "cannot be decoded"),  # broken 12-bit JPEG stream
    "JPEG2000-embedded-sequence-delimiter.dcm": ("CorruptDicom", "cannot be decoded"),
    "MR_truncated.dcm": ("CorruptDicom", "less than expected"),
    "badVR.dcm": ("CorruptDicom", "inconsistent header"),
    "17166": ("CorruptDicom", "blank"),  # 16×16 thumbnails entirely outside their window
    "17196": ("CorruptDicom", "blank"),
    "meta_missing_tsyntax.dcm": ("CorruptDicom", "Bits Allocated"),
    "nested_priv_SQ.dcm": ("CorruptDicom", "Bits Allocated"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": ("CorruptDicom", "truncated"),
}


def _rel(path: Path) -> str:
    return path.relative_to(path.parents[1]).as_posix()


def _has_image(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse holds no image for us
        return False
    return "PixelData" in ds and "Rows" in ds and "BitsAllocated" in ds


def test_the_corpus_is_complete():
    names = {p.name for p in CORPUS}
    assert len(CORPUS) > 200 and len(list(PYDICOM_DATA.glob("*.dcm"))) == 68
    assert set(KNOWN_BAD) <= names


@pytest.mark.parametrize("path", CORPUS, ids=_rel)
def test_every_file_renders_or_is_named_with_a_reason(path):
    try:
        images = prepare_all(str(path), PreprocessConfig(max_edge=512), name=str(path))
    except RadflowError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(f'"{path}": ') and len(exc.args[0]) > len(str(path)) + 8
        if path.name in KNOWN_BAD:
            kind, word = KNOWN_BAD[path.name]
            assert exc.kind == kind and word in message
        else:  # only objects without an image may fail
            assert not _has_image(path), message
        return
    assert path.name not in KNOWN_BAD, "a known bad file rendered"
    for image in images:
        img = Image.open(io.BytesIO(image.png))
        assert img.format == "PNG" and img.size == (image.width, image.height)
        assert max(img.size) <= 512 and img.mode in ("L", "RGB")
        assert np.asarray(img).std() > 0


def _windowed() -> list[tuple[str, int]]:
    out = []
    for path in CORPUS:
        if path.name in KNOWN_BAD or not path.name.endswith(".dcm"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable files are covered above
            continue
        if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
            continue
        if "WindowCenter" in ds and "WindowWidth" in ds:
            centers = ds.WindowCenter
            n = len(centers) if isinstance(centers, pydicom.multival.MultiValue) else 1
            out += [(str(path), i) for i in range(n)]
        elif "VOILUTSequence" in ds:
            out.append((str(path), 0))
    return out


WINDOWED = _windowed()


def _reference(ds: pydicom.Dataset, arr: np.ndarray, index: int) -> np.ndarray:
    """pydicom's modality LUT + VOI ``index``, mapped linearly from its output range to
    0..255, inverted for MONOCHROME1 (PS3.3 C.11.2.1)."""
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" not in ds:
        bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
        grey = apply_voi_lut(arr, ds, index=index).astype(np.float64) * 255 / (2**bits - 1)
    else:
        y = apply_voi_lut(arr, ds, index=index, prefer_lut=False).astype(np.float64)
        ends = np.array([-1e12, 1e12])
        lo, hi = apply_voi_lut(ends, ds, index=index, prefer_lut=False).astype(np.float64)
        grey = (y - lo) * 255 / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return grey


def test_the_corpus_has_windows_to_check():
    assert len(WINDOWED) >= 30
    assert any(i == 1 for _, i in WINDOWED)  # files with several header windows


@pytest.mark.parametrize("path,index", WINDOWED, ids=lambda v: Path(str(v)).name)
def test_header_window_by_index_matches_pydicom(path, index):
    ds = load(path)
    out, label, frames = render_frames(ds, WindowName.HEADER, None, header_window=index)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frames[0]]
    ref = _reference(ds, arr, index)
    assert np.abs(out[0].astype(np.float64) - ref).max() <= 1.0, label


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "693_UNCI.dcm", "RG1_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"]
)
def test_voi_lut_functions_match_pydicom(name, function):
    ds = load(pydicom.data.get_testdata_file(name, download=False))
    ds.VOILUTFunction = function
    out, label, _ = render(ds, WindowName.HEADER)
    assert function.lower() in label
    assert np.abs(out.astype(np.float64) - _reference(ds, ds.pixel_array, 0)).max() <= 1.0


def test_header_window_index_out_of_range_is_named():
    ds = load(pydicom.data.get_testdata_file("MR_small.dcm", download=False))
    with pytest.raises(UnsupportedImage, match="header window 3 .* 1 window"):
        render(ds, WindowName.HEADER, header_window=3)


def test_modality_lut_sequence_comes_before_the_window():
    ds = load(pydicom.data.get_testdata_file("mlut_18.dcm", download=False))
    assert "ModalityLUTSequence" in ds
    out, label, _ = render(ds, WindowName.NONE)
    mod = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    ref = (mod - mod.min()) * 255 / (mod.max() - mod.min())
    assert label == "full range" and np.abs(out - ref).max() <= 1.0
    # a preset on the modality output, not on the stored values
    out, _, _ = render(ds, WindowName.BRAIN)
    assert np.abs(out - window_to_grey(mod, 40, 80)).max() <= 1.0


@pytest.mark.parametrize("preset", ["lung", "mediastinum", "bone", "brain", "abdomen"])
@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "bad_sequence.dcm"])
def test_ct_presets_match_pydicom_windowing(name, preset):
    from tasks.imaging.preprocess import PRESETS

    ds = load(pydicom.data.get_testdata_file(name, download=False))
    out, label, _ = render(ds, preset)
    c, w = PRESETS[WindowName(preset)]
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = c, w, "LINEAR"
    ds.pop("VOILUTSequence", None)
    assert label.startswith(preset)
    assert np.abs(out.astype(np.float64) - _reference(ds, ds.pixel_array, 0)).max() <= 1.0


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_UNCI.dcm"])
def test_monochrome1_is_white_at_minimum(name):
    ds = load(pydicom.data.get_testdata_file(name, download=False))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out, _, _ = render(ds, WindowName.NONE)
    arr = ds.pixel_array
    assert out[arr == arr.min()].min() == 255 and out[arr == arr.max()].max() == 0


PALETTES = [
    "OBXXXX1A.dcm",
    "OBXXXX1A_rle.dcm",
    "OBXXXX1A_expb_2frame.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "examples_palette.dcm",
    "OT-PAL-8-face.dcm",
]


@pytest.mark.parametrize("name", PALETTES)
def test_palette_16_bit_luts_are_scaled_like_apply_color_lut(name):
    ds = load(pydicom.data.get_testdata_file(name, download=False))
    out, label, frame = render(ds)
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    ref = apply_color_lut(arr, ds).astype(np.float64) * 255 / (2**bits - 1)
    assert bits == 16 and label == "colour"
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-9


@pytest.mark.parametrize(
    "name,tolerance",
    [
        ("SC_ybr_full_uncompressed.dcm", 6),  # 8-bit YCbCr round trip of the RGB original
        ("SC_ybr_full_422_uncompressed.dcm", 6),
        ("SC_rgb_dcmtk_+eb+cy+s4.dcm", 6),  # JPEG, YBR_FULL, no subsampling
        ("SC_rgb_jpeg_dcmtk.dcm", 6),
        ("SC_rgb_rle_16bit.dcm", 0),
        ("SC_rgb_32bit.dcm", 0),
    ],
)
def test_ybr_and_deep_rgb_become_the_same_rgb(name, tolerance):
    rgb, _, _ = render(load(pydicom.data.get_testdata_file("SC_rgb.dcm", download=False)))
    other, label, _ = render(load(pydicom.data.get_testdata_file(name, download=False)))
    assert label == "colour" and other.shape == rgb.shape == (100, 100, 3)
    assert np.abs(other.astype(int) - rgb.astype(int)).max() <= tolerance


def test_enhanced_ct_takes_rescale_and_window_from_functional_groups():
    ds = load(pydicom.data.get_testdata_file("eCT_Supplemental.dcm", download=False))
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    out, label, frame = render(ds, WindowName.HEADER)
    assert label == "header 49/102 linear" and frame == 1
    hu = ds.pixel_array[1].astype(np.float64) - 1024  # shared Pixel Value Transformation
    assert np.abs(out - window_to_grey(hu, 49, 102)).max() <= 1.0
