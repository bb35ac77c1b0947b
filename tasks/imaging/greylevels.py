"""Grey levels per DICOM PS3.3 C.11: modality LUT, VOI window or LUT, presets, MONOCHROME1,
and colour (RGB, YBR, PALETTE COLOR) — each through one lookup table per object."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from tasks.core.config import WindowName
from tasks.core.errors import CorruptDicom, UnsupportedImage, reading_header

__all__ = [
    "COLOUR",
    "MONO",
    "PRESETS",
    "lut_header",
    "render_colour",
    "render_mono",
    "window_to_grey",
]

# CT presets as (center, width) in HU (Radiopaedia).
PRESETS: dict[WindowName, tuple[float, float]] = {
    WindowName.LUNG: (-600.0, 1500.0),
    WindowName.MEDIASTINUM: (50.0, 350.0),
    WindowName.ABDOMEN: (50.0, 400.0),
    WindowName.BRAIN: (40.0, 80.0),
    WindowName.BONE: (400.0, 1800.0),
}

MONO = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


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


def _values(value: object) -> list[float]:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [float(v) for v in value]
    return [float(value)]


def _header_window(ds: pydicom.Dataset, index: int) -> tuple[float, float, str]:
    with reading_header():
        centers, widths = _values(ds.WindowCenter), _values(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
    n = min(len(centers), len(widths))
    if index >= n:
        raise UnsupportedImage(
            f"header window {index} was asked for but the header has {n} window(s)",
            hint="set preprocess.header_window to an index below the number of windows",
        )
    return centers[index], widths[index], function


def _grey_levels(
    values: np.ndarray, ds: pydicom.Dataset, window: WindowName, header_window: int = 0
) -> tuple[np.ndarray, str]:
    """Stored values → display grey 0..255 (float), and a label of the window used.

    PS3.3 C.11.1/C.11.2: the modality LUT (rescale or Modality LUT Sequence) comes first;
    the VOI is the header window, else the VOI LUT Sequence, else a preset or the full range.
    """
    with reading_header():  # pydicom's modality LUT reads Rescale* or the LUT sequence
        modality = apply_modality_lut(values, ds)
        luts = len(ds.VOILUTSequence) if "VOILUTSequence" in ds else 0
        ct = str(ds.get("Modality", "")) == "CT"
    has_voi_lut = luts > 0
    has_header_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window in (WindowName.AUTO, WindowName.HEADER):
        if has_header_window:
            c, w, fn = _header_window(ds, header_window)
            return window_to_grey(modality, c, w, fn), f"header {c:g}/{w:g} {fn.lower()}"
        if has_voi_lut:
            index = min(header_window, luts - 1)
            with reading_header():
                bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
                out = apply_voi_lut(modality, ds, index=index, prefer_lut=True)
            return np.asarray(out, np.float64) * (255.0 / (2**bits - 1)), "header VOI LUT"
        if window is WindowName.HEADER:
            raise UnsupportedImage("the header has no window (WindowCenter/Width or VOI LUT)")
        window = WindowName.MEDIASTINUM if ct else WindowName.NONE
    if window is WindowName.NONE:
        lo, hi = float(np.min(modality)), float(np.max(modality))
        if hi <= lo:
            return np.zeros_like(modality, dtype=np.float64), "full range"
        return (modality - lo) * (255.0 / (hi - lo)), "full range"
    c, w = PRESETS[window]
    return window_to_grey(modality, c, w), f"{window.value} {c:g}/{w:g}"


_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "Modality",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
# Enhanced multi-frame objects keep rescale and window in functional groups (PS3.3 C.7.6.16).
_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def lut_header(ds: pydicom.Dataset, frame: int) -> pydicom.Dataset:
    """The attributes the grey-level mapping needs, with an enhanced object's per-frame (else
    shared) Pixel Value Transformation and Frame VOI LUT macros in place of top-level ones."""
    out = pydicom.Dataset()
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    groups = [ds.get("SharedFunctionalGroupsSequence")]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.insert(0, per_frame)  # per-frame values win over shared ones
    for macro in _GROUPS:
        for seq in groups:
            item = seq[frame if seq is per_frame else 0] if seq else None
            if item is not None and macro in item and len(item[macro].value):
                for element in item[macro].value[0]:
                    if element.keyword and element.keyword not in out:
                        setattr(out, element.keyword, element.value)
                break
    return out


# Pixels per table lookup: numpy indexes with an int64 copy of the indices, 8 bytes a pixel
# (1 GiB for a 16384 × 8192 frame); in slices of this many it stays at 32 MiB.
_SLICE = 1 << 22


def _lookup(table: np.ndarray, values: np.ndarray, lo: int) -> np.ndarray:
    """``table[values - lo]`` (rows of ``table``), computed a slice of pixels at a time so the
    temporary index copy stays small."""
    flat = values.reshape(-1)
    out = np.empty((flat.size, *table.shape[1:]), table.dtype)
    for i in range(0, flat.size, _SLICE):
        np.take(table, flat[i : i + _SLICE].astype(np.int64) - lo, axis=0, out=out[i : i + _SLICE])
    return out.reshape(*values.shape, *table.shape[1:])


def render_mono(
    stack: np.ndarray, ds: pydicom.Dataset, window: WindowName, header_window: int
) -> tuple[np.ndarray, str]:
    if np.issubdtype(stack.dtype, np.integer) and stack.size > 1:
        # One lookup table from stored value to grey level instead of float math per pixel;
        # its domain is the data's own range, so "full range" means the data's range.
        lo, hi = int(stack.min()), int(stack.max())
        grey, label = _grey_levels(np.arange(lo, hi + 1, dtype=np.int64), ds, window, header_window)
        out = _lookup(np.rint(grey).astype(np.uint8), stack, lo)
    else:
        grey, label = _grey_levels(stack, ds, window, header_window)
        out = np.rint(grey).astype(np.uint8)
    with reading_header():
        inverted = ds.PhotometricInterpretation == "MONOCHROME1"
    if inverted:  # minimum displays white: invert after VOI
        np.subtract(255, out, out=out)
    return out, label


def render_colour(
    stack: np.ndarray, ds: pydicom.Dataset, palette: bool = False
) -> tuple[np.ndarray, str]:
    """RGB / YBR (converted to RGB by the decoder) and PALETTE COLOR through its LUT
    (PS3.3 C.7.6.3.1.5); LUT entries and samples above 8 bits are scaled to 0..255."""
    with reading_header():
        pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR" and not palette and np.issubdtype(stack.dtype, np.integer):
        # The palette applied once to every possible stored value, scaled to 8 bits: one
        # table lookup per pixel (same values as apply_color_lut + scaling per pixel).
        lo, hi = int(stack.min()), int(stack.max())
        table, _ = render_colour(np.arange(lo, hi + 1, dtype=stack.dtype), ds, palette=True)
        return _lookup(table, stack, lo), "colour"
    if pi == "PALETTE COLOR":
        with reading_header():  # pydicom's palette reads the LUT descriptors and data
            rgb = apply_color_lut(stack, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif pi in COLOUR:
        with reading_header():
            bits = int(ds.BitsStored)
        rgb = stack
    else:
        raise UnsupportedImage(f'photometric interpretation "{pi}" is not supported')
    if rgb.shape[-1] != 3:
        raise CorruptDicom(f"colour image decoded to shape {rgb.shape}, expected (rows, cols, 3)")
    if bits > 8:
        scaled = (rgb.astype(np.float64) * (255.0 / (2**bits - 1))).round()
        return np.clip(scaled, 0, 255).astype(np.uint8), "colour"
    return rgb.astype(np.uint8, copy=False), "colour"
