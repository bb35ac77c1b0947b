"""Preprocessing against pydicom's reference pipeline, on real files by name."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from simulator.samples import synthetic_ct
from tasks.core.config import PreprocessConfig, WindowName
from tasks.core.errors import CorruptDicom, NotDicom, PhiRisk, UnsupportedImage
from tasks.imaging.preprocess import prepare, prepare_all, render, render_frames, window_to_grey


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


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        ("YES", "yes"),
        ("yes", "yes"),  # any case
        (" Yes ", "yes"),  # any padding
        (["NO", "YES"], "yes"),  # any value of a (non-conforming) multi-value
        ("NO", "no"),
        (["NO", "NO"], "no"),
        (None, "unknown"),  # missing
        ("", "unknown"),  # empty
        ("MAYBE", "unknown"),
        (["NO", "MAYBE"], "unknown"),
    ],
)
def test_burned_in_policy(tmp_path, value, flag):
    """PS3.3 C.7.6.1: YES refuses under refuse and refuse_unknown; missing or anything but
    YES/NO is unknown: sent and flagged under refuse, refused under refuse_unknown."""
    path = synthetic_ct(tmp_path / "b.dcm", lesion=True, seed=2)
    ds = pydicom.dcmread(path)
    if value is not None:
        ds.BurnedInAnnotation = value
    ds.save_as(path)
    assert ("BurnedInAnnotation" in pydicom.dcmread(path)) is (value is not None)
    refused = {"yes": {"refuse", "refuse_unknown"}, "unknown": {"refuse_unknown"}, "no": set()}
    for policy in ("refuse", "refuse_unknown", "allow"):
        config = PreprocessConfig(burned_in=policy)
        if policy in refused[flag]:
            with pytest.raises(PhiRisk, match="BurnedInAnnotation is") as err:
                prepare(str(path), config)
            reason = str(err.value).split('": ', 1)[1]  # after the file's name
            assert "MAYBE" not in reason  # the header value is never quoted
        else:
            assert prepare(str(path), config).burned_in == flag
    print(f"\nRELIABILITY burned-in: {value!r} → {flag}, refused under {sorted(refused[flag])}")


def test_no_pixel_data_is_unsupported(tmp_path):
    path = synthetic_ct(tmp_path / "c.dcm", lesion=False, seed=3)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match="no pixel data"):
        render(ds)


def test_spaced_key_images_decode_evenly_spaced_frames():
    images = prepare_all(_file("emri_small.dcm"), PreprocessConfig(key_images="spaced:3"))
    assert [i.frame for i in images] == [1, 5, 8]
    assert len({i.sha256 for i in images}) == 3


def test_montage_puts_frames_in_one_grid_with_one_window():
    ds = pydicom.dcmread(_file("emri_small.dcm"))
    stack, label, frames = render_frames(ds, WindowName.AUTO, [1, 3, 6, 8])
    (image,) = prepare_all(
        _file("emri_small.dcm"), PreprocessConfig(key_images="montage:2x2", max_edge=0)
    )
    assert image.frames == (1, 3, 6, 8) and image.frame is None and image.window == label
    grid = np.asarray(Image.open(io.BytesIO(image.png)))
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 2)
    assert np.array_equal(grid[:64, :64], stack[0]) and np.array_equal(grid[66:, 66:], stack[3])


def test_only_the_needed_frames_are_decoded(tmp_path):
    """Frame 0 of an RLE multi-frame object is garbage: the middle frame still renders."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(_file("emri_small_RLE.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames[0] = b"\x00" * 64  # an RLE header claiming zero segments
    ds.PixelData = encapsulate(frames)
    path = tmp_path / "broken-first-frame.dcm"
    ds.save_as(path)
    assert prepare(str(path), PreprocessConfig()).frame == 5
    with pytest.raises(CorruptDicom, match="broken-first-frame.dcm.*cannot be decoded"):
        prepare(str(path), PreprocessConfig(key_images="spaced:10"))


@pytest.mark.parametrize("rule", ["spaced:0", "montage:0x2", "every", "spaced:3:4"])
def test_bad_key_image_rules_are_refused(rule):
    with pytest.raises(ValidationError, match="key_images"):
        PreprocessConfig(key_images=rule)


def test_provider_sized_images_need_no_rescaling():
    from tasks.imaging.sizing import anthropic_image_tokens, openai_image_tokens

    image = prepare(
        _file("RG1_UNCR.dcm"), PreprocessConfig(max_edge=0), providers=["openai", "anthropic"]
    )
    assert (image.width, image.height) == (1841, 1955)
    ow, oh = image.sizes["openai"]
    aw, ah = image.sizes["anthropic"]
    assert min(ow, oh) <= 768 and max(ow, oh) <= 2048 and min(ow, oh) >= 767
    assert max(aw, ah) <= 1568 and aw * ah <= 1_150_000 and aw * ah > 1_140_000
    for provider, (w, h) in image.sizes.items():
        assert Image.open(io.BytesIO(image.for_provider(provider))).size == (w, h)
    # the provider's own formula sees the same image it would after its resize
    assert openai_image_tokens(ow, oh) == openai_image_tokens(1841, 1955) == 85 + 170 * 4
    assert abs(anthropic_image_tokens(aw, ah) - anthropic_image_tokens(1841, 1955)) <= 2
    small = prepare(_file("CT_small.dcm"), PreprocessConfig(), providers=["openai", "anthropic"])
    assert small.for_provider("openai") is small.png and small.sizes["anthropic"] == (128, 128)
