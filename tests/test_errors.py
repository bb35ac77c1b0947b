"""What a parser failure says about its object (tasks.core.errors.parser_error), on real pydicom
reads of crafted bytes, and which failures are worth retrying."""

from __future__ import annotations

import io
import struct

import pydicom
import pytest
from prefect.states import Failed

from simulator.hostile import DEEP, deep_nesting
from simulator.samples import synthetic_ct
from tasks.core.errors import (
    CorruptDicom,
    ObjectMissing,
    RadflowError,
    StorageError,
    StorageUnavailable,
    StudiesFailed,
    UnsupportedImage,
    WorkerCrashed,
    is_transient,
    parser_error,
    reading_header,
    retry_if_transient,
)
from tasks.imaging.preprocess import render_frames


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (what the parser raised, whatever it is)
        return exc
    raise AssertionError("nothing was raised")


@pytest.mark.parametrize("after_pixels", [False, True])
def test_nesting_past_the_recursion_limit_says_so_with_the_depth(tmp_path, after_pixels):
    good = synthetic_ct(tmp_path / "a.dcm", lesion=False, seed=1, size=64)
    bad = deep_nesting(good, tmp_path / "deep.dcm", 2, after_pixels=after_pixels)
    exc = _raised(lambda: pydicom.dcmread(bad))
    error = parser_error(exc, '"deep.dcm" cannot be read')
    assert isinstance(error, CorruptDicom)
    depth = int(str(error).split("more than ")[1].split()[0])
    assert 50 < depth < DEEP, error  # where Python's recursion limit stopped pydicom
    assert str(error).startswith(
        f'"deep.dcm" cannot be read: nesting too deep (more than {depth} levels of nested sequences)'
    )


def test_a_storage_error_under_the_parser_keeps_its_meaning():
    """pydicom re-raises a failed read of an item header as a bare OSError ("No tag to
    read"): the store's StorageUnavailable behind it is what the caller gets."""
    item_tag = b"\xfe\xff\x00\xe0"

    class Failing(io.BytesIO):  # a ranged S3 read that fails at the fifth item
        items = 0

        def read(self, n: int = -1) -> bytes:
            if n == 8 and self.getvalue()[self.tell() : self.tell() + 4] == item_tag:
                self.items += 1
                if self.items == 5:
                    raise StorageUnavailable('cannot read "s3://b/k": SlowDown')
            return super().read(n)

    item = (
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + struct.pack("<HH2sH", 0x0008, 0x1155, b"UI", 4)
        + b"1.2\0"
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    )
    data = (
        struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + item * 10
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    exc = _raised(lambda: pydicom.dcmread(Failing(data), force=True))
    assert type(exc) is OSError and "No tag to read" in str(exc)
    assert isinstance(parser_error(exc, "x"), StorageUnavailable)


def test_other_parser_errors_keep_their_message_in_one_line(tmp_path):
    data = synthetic_ct(tmp_path / "a.dcm", lesion=False, seed=1, size=64).read_bytes()
    exc = _raised(lambda: pydicom.dcmread(io.BytesIO(data[:154])))  # cut inside the file meta
    error = parser_error(exc, '"cut.dcm" has an unreadable header')
    assert isinstance(error, CorruptDicom)
    assert str(error).startswith(f'"cut.dcm" has an unreadable header: {exc}')
    several = ValueError("Unable to decode:\n  pylibjpeg: no\n  gdcm: no")  # decoders' style
    assert parser_error(several, "z").args[0] == "z: Unable to decode:; pylibjpeg: no; gdcm: no"
    assert parser_error(MemoryError(), "y").args[0] == (
        "y: decoding needs more memory than this process could allocate (MemoryError)"
    )


def test_reading_header_turns_header_errors_into_the_objects_record_and_nothing_else():
    for exc in (ValueError("bad DS"), TypeError("t"), AttributeError("a"), KeyError("k")):
        with pytest.raises(CorruptDicom, match=r"^inconsistent header: ") as info, reading_header():
            raise exc
        assert info.value.__cause__ is exc
    for other in (RuntimeError("bug"), UnsupportedImage("no pixel data"), ZeroDivisionError()):
        with pytest.raises(type(other)) as info, reading_header():
            raise other
        assert info.value is other  # as it was: not the header's fault


def test_a_hostile_header_value_is_the_objects_error_and_a_radflow_bug_stays_a_bug(tmp_path):
    """A window center that is not a number (pydicom converts it on first use) is that
    file's CorruptDicom; radflow's own code misused (frame indices that are not numbers)
    raises its TypeError: it is not blamed on the header."""
    path = synthetic_ct(tmp_path / "a.dcm", lesion=False, seed=1, size=64)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = "12345.6789", "400"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue().replace(b"12345.6789", b"forty.four")  # raw: read on first use
    with pytest.raises(CorruptDicom, match="inconsistent header: .*forty"):
        render_frames(pydicom.dcmread(io.BytesIO(data)), "header")
    with pytest.raises(TypeError) as info:
        render_frames(pydicom.dcmread(path), "auto", [None])  # type: ignore[list-item]
    assert not isinstance(info.value, RadflowError)


def test_only_transient_failures_are_worth_a_retry():
    assert is_transient(StorageUnavailable()) and is_transient(WorkerCrashed())
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(StorageError()) and not is_transient(ObjectMissing())
    assert not is_transient(CorruptDicom()) and not is_transient(RecursionError())
    assert not is_transient(StudiesFailed()) and is_transient(StudiesFailed(transient=True))
    failed = Failed(data=StudiesFailed("1 of 2 studies failed", transient=False))
    assert not retry_if_transient(None, None, failed)  # the screen-studies retry condition
