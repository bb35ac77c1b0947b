"""Hostile inputs for the reliability suite and benchmark: files that look like DICOM but are
not, are cut short, claim gigabytes of pixels, hold no image, repeat an instance, or carry odd
names; next to a few good studies. Each entry says what the screening run must make of it."""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless, generate_uid

from simulator.samples import synthetic_ct

__all__ = [
    "DEEP",
    "HUGE",
    "Expected",
    "build_hostile_folder",
    "deep_nesting",
    "huge_claim",
    "large_rle",
]

HUGE = {"Rows": 65535, "Columns": 65535, "NumberOfFrames": 1000}  # ≈ 8.6 TB at 16 bits
DEEP = 1000  # nested sequences: pydicom gives up (RecursionError) after about 200


@dataclass(frozen=True)
class Expected:
    """What a screening run must make of one file: a report ("report") or an error record
    of ``kind``; ``why`` is what the file is."""

    kind: str
    why: str


def _png_bytes() -> bytes:
    """A valid 1×1 grey PNG."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


def _pixel_offset(path: Path) -> int:
    """Byte offset where the (7FE0,0010) element's value starts."""
    ds = pydicom.dcmread(path, defer_size=64)
    return ds["PixelData"].file_tell


def _variant(src: Path, dest: Path, seed: int, **changes: object) -> Path:
    """Copy ``src`` with new UIDs (its own study) and the header ``changes``."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["hostile-study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["hostile-series", str(seed)])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["hostile-sop", str(seed)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if keyword == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        elif value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def huge_claim(
    src: Path, dest: Path, seed: int, *, compressed: bool, frames: int = HUGE["NumberOfFrames"]
) -> Path:
    """A CT slice whose header claims 65535² pixels × ``frames`` while the data holds one
    small frame: native bytes, or one valid RLE frame (compressed). Without a check, pydicom
    3.0 allocates and fills Rows × Columns × 2 bytes (8 GiB) for the one-frame RLE claim
    before finding that the segment is short."""
    ds = pydicom.dcmread(src)
    changes: dict[str, object] = {**HUGE, "NumberOfFrames": frames}
    if compressed:
        # a real RLE frame of the small image, wrapped as the first of the claimed frames
        ds.compress(RLELossless, encoding_plugin="pydicom")
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        changes["PixelData"] = encapsulate([frame])
        changes["TransferSyntaxUID"] = RLELossless
    tmp = dest.with_suffix(".src")
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(tmp, enforce_file_format=True)
    try:
        out = _variant(tmp, dest, seed, **changes)
    finally:
        tmp.unlink()
    if compressed:  # save_as keeps the undefined length; the encapsulated flag must say so
        check = pydicom.dcmread(out, stop_before_pixels=True)
        assert check.file_meta.TransferSyntaxUID == RLELossless
    return out


def _nested_sequences(tag: int, depth: int, *, defined: bool) -> bytes:
    """``depth`` sequences nested in one another, one item each (explicit VR little endian,
    PS3.5 7.5): of undefined length (pydicom parses them as it reads the file) or of
    defined length (pydicom parses them when the value is first used)."""
    if not defined:
        sq = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return (sq + item) * depth + ends * depth
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(item)) + item
    return inner


def deep_nesting(
    src: Path,
    dest: Path,
    seed: int,
    *,
    after_pixels: bool = False,
    defined: bool = False,
    depth: int = DEEP,
) -> Path:
    """A copy of ``src`` (its own study) with ``depth`` nested sequences: in the header just
    before the pixel data (a Content Sequence; with ``defined`` lengths an Other Patient IDs
    Sequence, which an SR copies from its source), or after the pixel data as a Digital
    Signatures Sequence (a header read stopping before the pixels succeeds, the full read
    fails)."""
    _variant(src, dest, seed)
    data = dest.read_bytes()
    if after_pixels:
        dest.write_bytes(data + _nested_sequences(0xFFFAFFFA, depth, defined=defined))
    else:
        at = _pixel_offset(dest) - 12  # the PixelData element's tag (OW: 12-byte header)
        tag = 0x00101002 if defined else 0x0040A730
        dest.write_bytes(data[:at] + _nested_sequences(tag, depth, defined=defined) + data[at:])
    return dest


def large_rle(dest: Path, seed: int, *, rows: int = 8192, columns: int = 16384) -> Path:
    """A CT of one 16-bit frame of ``rows`` × ``columns`` (by default 256 MiB decoded, the
    largest frame radflow accepts) in about 4 MiB of RLE (PS3.5 G): every run is 128 equal
    bytes, a pattern of grey bands and squares. ``columns`` must be a multiple of 128."""
    synthetic_ct(dest, lesion=True, seed=seed, size=64)
    ds = pydicom.dcmread(dest)
    band = np.arange(rows)[:, None] // 64 + np.arange(columns // 128)[None, :]
    runs = (1064 + (band % 7) * 60).astype(">u2")  # one stored value per run of 128 pixels
    segments = []
    for plane in (runs >> 8, runs & 0xFF):  # most significant byte first (G.2)
        coded = np.empty((*plane.shape, 2), np.uint8)
        coded[..., 0] = 0x81  # -127: the next byte, 128 times
        coded[..., 1] = plane
        segments.append(coded.tobytes())
    header = np.zeros(16, "<u4")
    header[:3] = 2, 64, 64 + len(segments[0])
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([header.tobytes() + b"".join(segments)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(dest, enforce_file_format=True)
    return dest


def build_hostile_folder(dest: str | Path, *, good: int = 3) -> dict[str, Expected]:
    """Fill ``dest`` with ``good`` good studies (odd file names) and the hostile files;
    returns {relative path: Expected}."""
    dest = Path(dest)
    made: dict[str, Expected] = {}
    odd = [
        "good/with spaces and ünïcödé 환자.dcm",
        "good/100% done.dcm",
        "good/-leading-dash.dcm",
        "good/" + "very-long-name-" * 14 + ".dcm",
    ]
    for i in range(good):
        rel = odd[i % len(odd)]
        synthetic_ct(dest / rel, lesion=i % 2 == 0, seed=500 + i, size=128)
        made[rel] = Expected("report", f"good CT study, odd file name {rel!r}")
    base = dest / "good" / odd[0].split("/", 1)[1]

    bad = dest / "hostile"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "empty.dcm").write_bytes(b"")
    made["hostile/empty.dcm"] = Expected("NotDicom", "zero-byte file")
    (bad / "notes.dcm").write_text("Patient notes, definitely not DICOM\n" * 20)
    made["hostile/notes.dcm"] = Expected("NotDicom", "a text file named .dcm")
    (bad / "picture.dcm").write_bytes(_png_bytes())
    made["hostile/picture.dcm"] = Expected("NotDicom", "a PNG file named .dcm")

    data = synthetic_ct(bad / "src.tmp", lesion=True, seed=601, size=128).read_bytes()
    (bad / "src.tmp").unlink()
    (bad / "truncated-header.dcm").write_bytes(data[:300])  # inside the meta/dataset header
    made["hostile/truncated-header.dcm"] = Expected("CorruptDicom", "header cut at 300 bytes")
    src = synthetic_ct(bad / "cut.tmp", lesion=True, seed=602, size=128)
    start = _pixel_offset(src)
    cut = src.read_bytes()[: start + (len(data) - start) // 2]
    src.unlink()
    (bad / "truncated-pixels.dcm").write_bytes(cut)
    made["hostile/truncated-pixels.dcm"] = Expected("CorruptDicom", "pixel data cut in half")

    _variant(base, bad / "no-pixels.dcm", 603, PixelData=None)
    made["hostile/no-pixels.dcm"] = Expected("UnsupportedImage", "CT header without pixel data")
    huge_claim(base, bad / "huge-native.dcm", 604, compressed=False)
    made["hostile/huge-native.dcm"] = Expected(
        "UnsupportedImage", "header claims 65535²×1000 frames, native"
    )
    huge_claim(base, bad / "huge-rle.dcm", 605, compressed=True)
    made["hostile/huge-rle.dcm"] = Expected(
        "UnsupportedImage", "header claims 65535²×1000 frames, RLE"
    )
    huge_claim(base, bad / "huge-rle-1-frame.dcm", 608, compressed=True, frames=1)
    made["hostile/huge-rle-1-frame.dcm"] = Expected(
        "UnsupportedImage", "header claims one 65535² frame (8 GiB), RLE"
    )
    _variant(base, bad / "unknown-syntax.dcm", 606, TransferSyntaxUID="1.2.826.0.1.3680043.2.1")
    made["hostile/unknown-syntax.dcm"] = Expected("UnsupportedImage", "unknown transfer syntax")
    _variant(base, bad / "purple.dcm", 607, PhotometricInterpretation="PURPLE")
    made["hostile/purple.dcm"] = Expected(
        "UnsupportedImage", "impossible photometric interpretation"
    )
    for name, what in (("rtplan.dcm", "RT plan"), ("test-SR.dcm", "structured report")):
        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(f'"{name}" is missing from pydicom\'s test files')
        shutil.copyfile(path, bad / name)
        made[f"hostile/{name}"] = Expected("UnsupportedImage", f"non-image object ({what})")
    for name, seed, options, where in (
        ("deep-nesting", 609, {}, "in the header"),
        ("deep-nesting-after-pixels", 610, {"after_pixels": True}, "after the pixel data"),
        ("deep-nesting-defined-length", 611, {"defined": True}, "of defined length"),
    ):
        deep_nesting(base, bad / f"{name}.dcm", seed, **options)
        made[f"hostile/{name}.dcm"] = Expected(
            "CorruptDicom", f"{DEEP} nested sequences {where} (RecursionError in pydicom)"
        )
    shutil.copyfile(base, bad / "duplicate of a good one.dcm")
    made["hostile/duplicate of a good one.dcm"] = Expected(
        "DuplicateInstance", "the same instance as a good file, copied"
    )
    return made
