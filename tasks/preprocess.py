"""Turn a DICOM instance into what a radiologist would look at: decode, modality LUT, VOI
window, MONOCHROME1 inversion, 8-bit, resize, PNG. Pixels only leave this module."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from tasks.config import PreprocessConfig, WindowName
from tasks.errors import CorruptDicom, PhiRisk, RadflowError, UnsupportedImage

__all__ = [
    "PRESETS",
    "PreparedImage",
    "encode_png",
    "prepare",
    "render",
    "resize",
    "window_to_grey",
]

logger = logging.getLogger(__name__)

# CT presets as (center, width) in HU (Radiopaedia).
PRESETS: dict[WindowName, tuple[float, float]] = {
    WindowName.LUNG: (-600.0, 1500.0),
    WindowName.MEDIASTINUM: (50.0, 350.0),
    WindowName.ABDOMEN: (50.0, 400.0),
    WindowName.BRAIN: (40.0, 80.0),
    WindowName.BONE: (400.0, 1800.0),
}

_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


@dataclass(frozen=True)
class PreparedImage:
    """One rendered key image: PNG bytes plus what identifies it (no patient data)."""

    png: bytes
    sha256: str
    width: int
    height: int
    window: str
    frame: int | None


def window_to_grey(
    x: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map values to 0..255 by a VOI window, PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT)
    and C.11.2.1.3 (SIGMOID), with y_min = 0 and y_max = 255."""
    x = np.asarray(x, dtype=np.float64)
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise UnsupportedImage(f"LINEAR_EXACT window width must be > 0, got {width}")
        y = ((x - center) / width + 0.5) * 255.0
    else:
        if width < 1:
            raise UnsupportedImage(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:  # C.11.2.1.2.1 with w = 1 is a threshold at c - 0.5
            return np.where(x > center - 0.5, 255.0, 0.0)
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(y, 0.0, 255.0)


def _first(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _grey_levels(
    values: np.ndarray, ds: pydicom.Dataset, window: WindowName
) -> tuple[np.ndarray, str]:
    """Stored values → display grey 0..255 (float), and a label of the window used."""
    modality = apply_modality_lut(values, ds)
    has_voi_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_header_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window in (WindowName.AUTO, WindowName.HEADER):
        if has_voi_lut and not has_header_window:
            lut = ds.VOILUTSequence[0]
            bits = int(lut.LUTDescriptor[2])
            out = apply_voi_lut(modality, ds, index=0, prefer_lut=True)
            return np.asarray(out, dtype=np.float64) * (255.0 / (2**bits - 1)), "header VOI LUT"
        if has_header_window:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
            fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            return window_to_grey(modality, c, w, fn), f"header {c:g}/{w:g} {fn.lower()}"
        if window is WindowName.HEADER:
            raise UnsupportedImage("the header has no window (WindowCenter/Width or VOI LUT)")
        window = WindowName.MEDIASTINUM if str(ds.get("Modality", "")) == "CT" else WindowName.NONE
    if window is WindowName.NONE:
        lo, hi = float(np.min(modality)), float(np.max(modality))
        if hi <= lo:
            return np.zeros_like(modality, dtype=np.float64), "full range"
        return (modality - lo) * (255.0 / (hi - lo)), "full range"
    c, w = PRESETS[window]
    return window_to_grey(modality, c, w), f"{window.value} {c:g}/{w:g}"


def _render_mono(
    frame: np.ndarray, ds: pydicom.Dataset, window: WindowName
) -> tuple[np.ndarray, str]:
    if np.issubdtype(frame.dtype, np.integer) and frame.size > 1:
        # One lookup table from stored value to grey level instead of float math per pixel.
        lo, hi = int(frame.min()), int(frame.max())
        grey, label = _grey_levels(np.arange(lo, hi + 1, dtype=np.int64), ds, window)
        lut = np.rint(grey).astype(np.uint8)
        out = lut[frame.astype(np.int64) - lo]
    else:
        grey, label = _grey_levels(frame, ds, window)
        out = np.rint(grey).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # minimum displays white: invert after VOI
        out = 255 - out
    return out, label


def _render_colour(frame: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, str]:
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif pi in _COLOUR:
        rgb, bits = frame, int(ds.BitsStored)
    else:
        raise UnsupportedImage(f'photometric interpretation "{pi}" is not supported')
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise CorruptDicom(f"colour image decoded to shape {rgb.shape}, expected (rows, cols, 3)")
    if bits > 8:
        rgb = (rgb.astype(np.float64) * (255.0 / (2**bits - 1))).round()
    return np.clip(rgb, 0, 255).astype(np.uint8), "colour"


def render(
    ds: pydicom.Dataset, window: WindowName | str = WindowName.AUTO
) -> tuple[np.ndarray, str, int | None]:
    """Decode the key frame of ``ds`` and map it to 8-bit display values.

    PS3.3 C.11.2.1: modality LUT before VOI; MONOCHROME1 inverted after VOI. Multi-frame
    objects decode only their middle frame. Returns (pixels, window label, frame index).
    """
    window = WindowName(window)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedImage("no pixel data")
    pi = str(ds.get("PhotometricInterpretation", ""))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frames // 2 if frames > 1 else None
    try:
        frame = pixel_array(ds, index=index) if index is not None else ds.pixel_array
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        TypeError,
        AttributeError,
        KeyError,
    ) as exc:
        tsuid = ds.file_meta.get("TransferSyntaxUID", "unknown") if ds.file_meta else "unknown"
        name = getattr(tsuid, "name", tsuid)
        raise CorruptDicom(
            f'pixel data (transfer syntax "{name}") cannot be decoded: {exc}'
        ) from exc
    if pi in _MONO:
        if frame.ndim != 2:
            raise CorruptDicom(f"monochrome image decoded to shape {frame.shape}")
        out, label = _render_mono(frame, ds, window)
    else:
        out, label = _render_colour(frame, ds)
    if int(out.min()) == int(out.max()):
        if np.min(frame) != np.max(frame):
            raise CorruptDicom(
                f'the window "{label}" renders non-constant pixel data as a blank image'
            )
        raise UnsupportedImage("the image is blank (every pixel has the same value)")
    return out, label, index


def resize(pixels: np.ndarray, max_edge: int) -> Image.Image:
    """Fit the long edge into ``max_edge`` (0 = keep size); never upscales."""
    img = Image.fromarray(pixels)
    if max_edge and max(img.size) > max_edge:
        scale = max_edge / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def prepare(source: str | BinaryIO, config: PreprocessConfig, name: str = "") -> PreparedImage:
    """Read a DICOM file and render its key image as PNG; errors name ``name`` and the reason."""
    name = name or str(source)
    try:
        try:
            ds = pydicom.dcmread(source)
        except (pydicom.errors.InvalidDicomError, EOFError, ValueError, OSError, KeyError) as exc:
            raise CorruptDicom(f"cannot be read: {exc}") from exc
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and config.burned_in == "refuse":
            raise PhiRisk("BurnedInAnnotation is YES: the pixels may show patient identifiers")
        pixels, label, frame = render(ds, config.window)
        img = resize(pixels, config.max_edge)
        png = encode_png(img)
    except RadflowError as exc:
        raise type(exc)(f'"{name}": {exc.args[0]}', hint=exc.hint) from exc
    return PreparedImage(png, hashlib.sha256(png).hexdigest(), img.width, img.height, label, frame)
