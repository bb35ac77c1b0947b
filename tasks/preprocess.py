"""Turn a DICOM instance into what a radiologist would look at: decode, modality LUT, VOI
window, MONOCHROME1 inversion, 8-bit, key frames, provider-aware size, PNG. Only pixels
leave this module."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.config import PreprocessConfig, Provider, WindowName
from tasks.errors import CorruptDicom, NotDicom, PhiRisk, RadflowError, UnsupportedImage
from tasks.keyimages import montage, parse_rule, pick
from tasks.sizing import (
    ANTHROPIC_MAX_BYTES,
    encode_png,
    fit_size,
    provider_size,
    resize_to,
)

__all__ = [
    "PRESETS",
    "PreparedImage",
    "finish",
    "load",
    "prepare",
    "prepare_all",
    "render",
    "render_file",
    "render_frames",
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
# What pydicom and its decoders raise on inconsistent headers or undecodable pixel data.
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, TypeError, AttributeError)
_HEADER_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


@dataclass(frozen=True)
class PreparedImage:
    """One rendered key image: PNG bytes plus what identifies it (no patient data).

    ``png`` is sized by ``preprocess.max_edge``; ``sized`` holds, per provider, the PNG that
    provider accepts without rescaling (the same bytes when no smaller size is needed).
    """

    png: bytes
    sha256: str
    width: int
    height: int
    window: str
    frame: int | None
    frames: tuple[int, ...] = ()
    sized: dict[str, bytes] = field(default_factory=dict, repr=False)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def for_provider(self, provider: Provider | str) -> bytes:
        return self.sized.get(Provider(provider).value, self.png)


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
    centers, widths = _values(ds.WindowCenter), _values(ds.WindowWidth)
    n = min(len(centers), len(widths))
    if index >= n:
        raise UnsupportedImage(
            f"header window {index} was asked for but the header has {n} window(s)",
            hint="set preprocess.header_window to an index below the number of windows",
        )
    return centers[index], widths[index], str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")


def _grey_levels(
    values: np.ndarray, ds: pydicom.Dataset, window: WindowName, header_window: int = 0
) -> tuple[np.ndarray, str]:
    """Stored values → display grey 0..255 (float), and a label of the window used.

    PS3.3 C.11.1/C.11.2: the modality LUT (rescale or Modality LUT Sequence) comes first;
    the VOI is the header window, else the VOI LUT Sequence, else a preset or the full range.
    """
    modality = apply_modality_lut(values, ds)
    has_voi_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_header_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window in (WindowName.AUTO, WindowName.HEADER):
        if has_header_window:
            c, w, fn = _header_window(ds, header_window)
            return window_to_grey(modality, c, w, fn), f"header {c:g}/{w:g} {fn.lower()}"
        if has_voi_lut:
            index = min(header_window, len(ds.VOILUTSequence) - 1)
            bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
            out = apply_voi_lut(modality, ds, index=index, prefer_lut=True)
            return np.asarray(out, np.float64) * (255.0 / (2**bits - 1)), "header VOI LUT"
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


def _lut_header(ds: pydicom.Dataset, frame: int) -> pydicom.Dataset:
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


def _render_mono(
    stack: np.ndarray, ds: pydicom.Dataset, window: WindowName, header_window: int
) -> tuple[np.ndarray, str]:
    if np.issubdtype(stack.dtype, np.integer) and stack.size > 1:
        # One lookup table from stored value to grey level instead of float math per pixel;
        # its domain is the data's own range, so "full range" means the data's range.
        lo, hi = int(stack.min()), int(stack.max())
        grey, label = _grey_levels(np.arange(lo, hi + 1, dtype=np.int64), ds, window, header_window)
        lut = np.rint(grey).astype(np.uint8)
        if lo >= 0 and stack.dtype.kind == "u":
            out = np.take(np.pad(lut, (lo, 0)), stack)  # index by the stored value directly
        else:
            out = np.take(lut, stack.astype(np.int32) - lo)
    else:
        grey, label = _grey_levels(stack, ds, window, header_window)
        out = np.rint(grey).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # minimum displays white: invert after VOI
        np.subtract(255, out, out=out)
    return out, label


def _render_colour(
    stack: np.ndarray, ds: pydicom.Dataset, palette: bool = False
) -> tuple[np.ndarray, str]:
    """RGB / YBR (converted to RGB by the decoder) and PALETTE COLOR through its LUT
    (PS3.3 C.7.6.3.1.5); LUT entries and samples above 8 bits are scaled to 0..255."""
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR" and not palette and np.issubdtype(stack.dtype, np.integer):
        # The palette applied once to every possible stored value, scaled to 8 bits: one
        # table lookup per pixel (same values as apply_color_lut + scaling per pixel).
        lo, hi = int(stack.min()), int(stack.max())
        table, _ = _render_colour(np.arange(lo, hi + 1, dtype=stack.dtype), ds, palette=True)
        return np.take(table, stack.astype(np.int64) - lo, axis=0), "colour"
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(stack, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif pi in _COLOUR:
        rgb, bits = stack, int(ds.BitsStored)
    else:
        raise UnsupportedImage(f'photometric interpretation "{pi}" is not supported')
    if rgb.shape[-1] != 3:
        raise CorruptDicom(f"colour image decoded to shape {rgb.shape}, expected (rows, cols, 3)")
    if bits > 8:
        scaled = (rgb.astype(np.float64) * (255.0 / (2**bits - 1))).round()
        return np.clip(scaled, 0, 255).astype(np.uint8), "colour"
    return rgb.astype(np.uint8, copy=False), "colour"


def _decode(ds: pydicom.Dataset, index: int | None) -> np.ndarray:
    try:
        return pixel_array(ds, index=index)
    except _DECODE_ERRORS as exc:
        tsuid = ds.file_meta.get("TransferSyntaxUID", "unknown") if ds.file_meta else "unknown"
        name = getattr(tsuid, "name", tsuid)
        reason = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise CorruptDicom(
            f'pixel data (transfer syntax "{name}") cannot be decoded: {reason}'
        ) from exc


def render_frames(
    ds: pydicom.Dataset,
    window: WindowName | str = WindowName.AUTO,
    indices: Iterable[int] | None = None,
    header_window: int = 0,
) -> tuple[np.ndarray, str, list[int]]:
    """Decode only the frames ``indices`` (default: the middle one) and map them to 8-bit
    display values with one window for all. PS3.3 C.11.2.1: modality LUT before VOI;
    MONOCHROME1 inverted after VOI. Returns (frames × rows × cols [× 3], label, indices)."""
    window = WindowName(window)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if len(ds) == 0:
            raise CorruptDicom("no data elements after the file meta header: truncated?")
        if "Rows" in ds:
            raise UnsupportedImage("no pixel data, though it has image attributes: truncated?")
        raise UnsupportedImage("no pixel data")
    try:
        pi = str(ds.get("PhotometricInterpretation", ""))
        n = int(ds.get("NumberOfFrames", 1) or 1)
        wanted = sorted(set(indices)) if indices is not None else pick(n, parse_rule("middle"))
        if any(not 0 <= i < n for i in wanted):
            raise UnsupportedImage(f"frames {wanted} asked for, the object has {n}")
        stack = np.stack([_decode(ds, i if n > 1 else None) for i in wanted])
        if pi in _MONO:
            if stack.ndim != 3:
                raise CorruptDicom(f"monochrome image decoded to shape {stack.shape[1:]}")
            out, label = _render_mono(stack, _lut_header(ds, wanted[0]), window, header_window)
        else:
            out, label = _render_colour(stack, ds)
    except _HEADER_ERRORS as exc:
        raise CorruptDicom(f"inconsistent header: {exc}") from exc
    if int(out.min()) == int(out.max()):
        if np.min(stack) != np.max(stack):
            raise CorruptDicom(
                f'the window "{label}" renders non-constant pixel data as a blank image',
                hint="choose another window (preprocess.window) or check the header window",
            )
        raise UnsupportedImage("the image is blank (every pixel has the same value)")
    return out, label, wanted


def render(
    ds: pydicom.Dataset, window: WindowName | str = WindowName.AUTO, header_window: int = 0
) -> tuple[np.ndarray, str, int | None]:
    """The middle frame of ``ds`` as 8-bit display values: (pixels, window label, frame
    index or None for a single-frame object)."""
    out, label, wanted = render_frames(ds, window, None, header_window)
    multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
    return out[0], label, wanted[0] if multi else None


def _infer_transfer_syntax(ds: pydicom.Dataset) -> None:
    """A file without (0002,0010): its uncompressed encoding is known from how it parsed."""
    meta = ds.file_meta
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )


def load(source: str | BinaryIO) -> pydicom.Dataset:
    """Read a DICOM file. Files without the Part 10 preamble and meta header (older ACR-NEMA
    style) are accepted when they parse as an image."""
    try:
        try:
            ds = pydicom.dcmread(source)
        except pydicom.errors.InvalidDicomError:
            if hasattr(source, "seek"):
                source.seek(0)
            with warnings.catch_warnings():  # guessing the encoding of a non-Part-10 file
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(source, force=True)
            if "PixelData" not in ds or "Rows" not in ds:
                raise NotDicom("no DICOM Part 10 header, and no image in it") from None
        _infer_transfer_syntax(ds)
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, *_HEADER_ERRORS) as exc:
        raise CorruptDicom(f"cannot be read: {exc}") from exc
    return ds


def finish(
    pixels: np.ndarray,
    label: str,
    frames: list[int] | tuple[int, ...],
    config: PreprocessConfig,
    providers: Iterable[Provider | str] = (),
    multi: bool = True,
) -> PreparedImage:
    """Resize to ``config.max_edge`` and encode; per provider, also the PNG it takes as is."""
    h, w = pixels.shape[:2]
    size = fit_size(w, h, config.max_edge)
    img = resize_to(pixels, size)
    png = encode_png(img)
    sized: dict[str, bytes] = {}
    sizes: dict[str, tuple[int, int]] = {}
    by_size = {size: png}
    for provider in sorted({Provider(p) for p in providers}):
        target = provider_size(*size, provider)
        if target not in by_size:
            by_size[target] = encode_png(resize_to(pixels, target))
        data = by_size[target]
        while provider is Provider.ANTHROPIC and len(data) * 4 / 3 > ANTHROPIC_MAX_BYTES:
            target = (max(1, int(target[0] * 0.9)), max(1, int(target[1] * 0.9)))
            data = by_size[target] = encode_png(resize_to(pixels, target), compress_level=6)
        sized[provider.value], sizes[provider.value] = data, target
    frame = frames[0] if multi and len(frames) == 1 else None
    shown = tuple(frames) if multi else ()
    return PreparedImage(
        png, hashlib.sha256(png).hexdigest(), *img.size, label, frame, shown, sized, sizes
    )


def _check_burned_in(ds: pydicom.Dataset, config: PreprocessConfig) -> None:
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and config.burned_in == "refuse":
        raise PhiRisk("BurnedInAnnotation is YES: the pixels may show patient identifiers")


def prepare_all(
    source: str | BinaryIO,
    config: PreprocessConfig,
    name: str = "",
    providers: Iterable[Provider | str] = (),
) -> list[PreparedImage]:
    """Read a DICOM file and render its key images by ``config.key_images`` (one for a
    single-frame object); errors name ``name`` and the reason."""
    name = name or str(source)
    try:
        ds = load(source)
        _check_burned_in(ds, config)
        rule = parse_rule(config.key_images)
        try:
            n = int(ds.get("NumberOfFrames", 1) or 1)
        except _HEADER_ERRORS as exc:
            raise CorruptDicom(f"inconsistent header: {exc}") from exc
        stack, label, frames = render_frames(ds, config.window, pick(n, rule), config.header_window)
        if rule.kind == "montage" and len(frames) > 1:
            grid = montage(list(stack), rule.rows, rule.cols)
            return [finish(grid, label, frames, config, providers)]
        return [
            finish(s, label, [f], config, providers, n > 1)
            for s, f in zip(stack, frames, strict=True)
        ]
    except RadflowError as exc:
        raise type(exc)(f'"{name}": {exc.args[0]}', hint=exc.hint) from exc


def render_file(
    source: str | BinaryIO, config: PreprocessConfig, name: str = ""
) -> tuple[np.ndarray, str]:
    """The middle frame of a DICOM file as 8-bit display values and its window label (a tile
    of a series montage); errors name ``name`` and the reason."""
    name = name or str(source)
    try:
        ds = load(source)
        _check_burned_in(ds, config)
        pixels, label, _ = render(ds, config.window, config.header_window)
    except RadflowError as exc:
        raise type(exc)(f'"{name}": {exc.args[0]}', hint=exc.hint) from exc
    return pixels, label


def prepare(
    source: str | BinaryIO,
    config: PreprocessConfig,
    name: str = "",
    providers: Iterable[Provider | str] = (),
) -> PreparedImage:
    """The first key image of a DICOM file (see ``prepare_all``)."""
    return prepare_all(source, config, name, providers)[0]
