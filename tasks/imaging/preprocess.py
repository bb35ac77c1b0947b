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
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.core.config import PreprocessConfig, Provider, WindowName
from tasks.core.errors import (
    HEADER_ERRORS,
    CorruptDicom,
    NotDicom,
    PhiRisk,
    RadflowError,
    UnsupportedImage,
    parser_error,
    reading_header,
)
from tasks.imaging.greylevels import (
    COLOUR,
    MONO,
    PRESETS,
    lut_header,
    render_colour,
    render_mono,
    window_to_grey,
)
from tasks.imaging.keyimages import montage, parse_rule, pick
from tasks.imaging.sizing import (
    ANTHROPIC_MAX_BYTES,
    encode_png,
    fit_size,
    provider_size,
    resize_to,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PRESETS",
    "PreparedImage",
    "burned_in_flag",
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

# The largest decoded frame accepted (a 5120 × 4096 16-bit mammogram is 40 MiB): headers
# are untrusted, and a decoder allocates Rows × Columns × samples × bytes before it finds
# that the data holds far less.
MAX_FRAME_BYTES = 256 * 2**20
_RENDERABLE = (*MONO, *COLOUR, "PALETTE COLOR")


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
    burned_in: str = "unknown"  # burned_in_flag() of the source (the worst one of a montage)
    source_bytes: int = 0  # of the object(s) read for it; 0 on further images of one object

    def for_provider(self, provider: Provider | str) -> bytes:
        return self.sized.get(Provider(provider).value, self.png)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_claims(ds: pydicom.Dataset) -> None:
    """Check what the header claims before anything is decoded or allocated: a known
    transfer syntax (PS3.5 10), a photometric interpretation radflow renders (PS3.3
    C.7.6.3.1.2), and a frame size under ``MAX_FRAME_BYTES``. For native pixel data the
    claimed size is also checked against the bytes actually present."""
    with reading_header():
        tsuid = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
        pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if tsuid is not None and not pydicom.uid.UID(str(tsuid)).is_transfer_syntax:
        raise UnsupportedImage(f'transfer syntax "{tsuid}" is not supported (not in PS3.5/PS3.6)')
    if pi and pi not in _RENDERABLE:  # a missing one is a CorruptDicom from the decoder
        raise UnsupportedImage(f'photometric interpretation "{pi[:64]}" is not supported')
    if any(k not in ds for k in ("Rows", "Columns", "BitsAllocated")):
        return  # the decoder names what is missing
    with reading_header():
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        have = len(ds.PixelData) if "PixelData" in ds else None
    if min(rows, cols, samples, bits, frames) < 1:
        raise CorruptDicom(
            f"impossible image size: {rows}×{cols}, {samples} samples, {bits} bits, {frames} frames"
        )
    frame = rows * cols * samples * -(-bits // 8)
    claim = f"{rows}×{cols}×{samples} at {bits} bits × {frames} frames"
    if frame > MAX_FRAME_BYTES:
        raise UnsupportedImage(
            f"the header claims {claim} = {_size(frame)} per frame, {_size(frame * frames)} "
            f"in all; frames above {_size(MAX_FRAME_BYTES)} are refused before decoding",
            hint="a header this large is corrupt or hostile; check the file",
        )
    tsuid = pydicom.uid.UID(str(tsuid)) if tsuid is not None else None
    if have is not None and (tsuid is None or not tsuid.is_compressed):
        need = rows * cols * samples * bits * frames // 8
        if pi == "YBR_FULL_422":
            need = need * 2 // 3
        if have < need:
            raise CorruptDicom(
                f"pixel data truncated: {_size(have)} present, less than expected (the header "
                f"claims {claim} = {_size(need)})"
            )


def _decode(ds: pydicom.Dataset, index: int | None) -> np.ndarray:
    """One frame (or all, ``index`` None) decoded; anything the decoder raises is this
    object's CorruptDicom."""
    try:
        return pixel_array(ds, index=index)
    except RadflowError:
        raise
    except Exception as exc:  # the decoder's, for this object's bytes: a record, not a retry
        tsuid = ds.file_meta.get("TransferSyntaxUID", "unknown") if ds.file_meta else "unknown"
        name = getattr(tsuid, "name", tsuid)
        raise parser_error(exc, f'pixel data (transfer syntax "{name}") cannot be decoded') from exc


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
    if "PixelData" in ds:
        check_claims(ds)
    with reading_header():
        pi = str(ds.get("PhotometricInterpretation", ""))
        n = int(ds.get("NumberOfFrames", 1) or 1)
    wanted = sorted(set(indices)) if indices is not None else pick(n, parse_rule("middle"))
    if any(not 0 <= i < n for i in wanted):
        raise UnsupportedImage(f"frames {wanted} asked for, the object has {n}")
    stack = np.stack([_decode(ds, i if n > 1 else None) for i in wanted])
    if pi in MONO:
        if stack.ndim != 3:
            raise CorruptDicom(f"monochrome image decoded to shape {stack.shape[1:]}")
        with reading_header():
            lut = lut_header(ds, wanted[0])
        out, label = render_mono(stack, lut, window, header_window)
    else:
        out, label = render_colour(stack, ds)
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
    except RadflowError:
        raise
    except Exception as exc:  # the parser's, for this object's bytes (nesting too deep, ...)
        raise parser_error(exc, "cannot be read") from exc
    _infer_transfer_syntax(ds)
    return ds


def finish(
    pixels: np.ndarray,
    label: str,
    frames: list[int] | tuple[int, ...],
    config: PreprocessConfig,
    providers: Iterable[Provider | str] = (),
    multi: bool = True,
    burned_in: str = "unknown",
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
    sha = hashlib.sha256(png).hexdigest()
    return PreparedImage(png, sha, *img.size, label, frame, shown, sized, sizes, burned_in)


def burned_in_flag(ds: pydicom.Dataset) -> str:
    """What Burned In Annotation (0028,0301; PS3.3 C.7.6.1, Enumerated Values YES, NO) says:
    "yes" when any value is YES (any case, spaces stripped: a multi-valued element counts if
    one value says YES), "no" when every value is NO, "unknown" otherwise (missing, empty,
    unreadable or anything else). Pixel text is not looked for: a file that carries text
    without the flag is "no" or "unknown" here."""
    try:
        raw = ds.get("BurnedInAnnotation")
    except HEADER_ERRORS:  # pydicom converting an unreadable value
        return "unknown"
    values = raw if isinstance(raw, MultiValue) else [] if raw is None else [raw]
    words = {str(v).strip().upper() for v in values}
    if "YES" in words:
        return "yes"
    return "no" if words == {"NO"} else "unknown"


def _check_burned_in(ds: pydicom.Dataset, config: PreprocessConfig) -> str:
    """The flag (see :func:`burned_in_flag`); raises PhiRisk when ``preprocess.burned_in``
    refuses it: YES under refuse and refuse_unknown, unknown under refuse_unknown."""
    flag = burned_in_flag(ds)
    if flag == "yes" and config.burned_in != "allow":
        raise PhiRisk("BurnedInAnnotation is YES: the pixels may show patient identifiers")
    if flag == "unknown" and config.burned_in == "refuse_unknown":
        state = "neither YES nor NO" if "BurnedInAnnotation" in ds else "missing"
        raise PhiRisk(
            f"BurnedInAnnotation is {state} (preprocess.burned_in: refuse_unknown): "
            "the pixels may show patient identifiers"
        )
    return flag


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
        flag = _check_burned_in(ds, config)
        rule = parse_rule(config.key_images)
        with reading_header():
            n = int(ds.get("NumberOfFrames", 1) or 1)
        stack, label, frames = render_frames(ds, config.window, pick(n, rule), config.header_window)
        if rule.kind == "montage" and len(frames) > 1:
            grid = montage(list(stack), rule.rows, rule.cols)
            return [finish(grid, label, frames, config, providers, burned_in=flag)]
        return [
            finish(s, label, [f], config, providers, n > 1, flag)
            for s, f in zip(stack, frames, strict=True)
        ]
    except RadflowError as exc:
        raise type(exc)(f'"{name}": {exc.args[0]}', hint=exc.hint) from exc


def render_file(
    source: str | BinaryIO, config: PreprocessConfig, name: str = ""
) -> tuple[np.ndarray, str, str]:
    """The middle frame of a DICOM file as 8-bit display values, its window label and its
    burned-in flag (a tile of a series montage); errors name ``name`` and the reason."""
    name = name or str(source)
    try:
        ds = load(source)
        flag = _check_burned_in(ds, config)
        pixels, label, _ = render(ds, config.window, config.header_window)
    except RadflowError as exc:
        raise type(exc)(f'"{name}": {exc.args[0]}', hint=exc.hint) from exc
    return pixels, label, flag


def prepare(
    source: str | BinaryIO,
    config: PreprocessConfig,
    name: str = "",
    providers: Iterable[Provider | str] = (),
) -> PreparedImage:
    """The first key image of a DICOM file (see ``prepare_all``)."""
    return prepare_all(source, config, name, providers)[0]
