"""A memory budget for decoding key images across every study in flight in this process: a
study waits until what its headers claim its rendering needs fits, and holds it until its
key images are rendered, whether that runs in a thread or in the process pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import UID, RLELossless

from tasks.core.config import PreprocessConfig, RunnerConfig
from tasks.imaging.keyimages import parse_rule
from tasks.imaging.preprocess import MAX_FRAME_BYTES

if TYPE_CHECKING:
    from tasks.ingest.discover import Study

__all__ = [
    "DECODE_FACTOR",
    "DecodeBudget",
    "decode_budget",
    "decode_claim",
    "decode_factor",
    "default_budget_bytes",
    "memory_bytes",
]

logger = logging.getLogger(__name__)

# Peak memory of rendering, in decoded frame sizes, on top of the object's own bytes (pydicom
# reads them whole). Measured as peak RSS over the process's own, for one 16-bit frame:
# native and RLE 2.0x (the decoded frame and the stack of frames shown; the grey-level
# lookup goes a slice at a time), JPEG 2000 4.8x (openjpeg's int32 buffers besides). Other
# compressed transfer syntaxes, and unknown ones, are charged DECODE_FACTOR.
DECODE_FACTOR = 5
_FACTORS = {"native": 2, RLELossless: 2}
_MAX_DEFAULT = 8 * 2**30  # the default budget's ceiling

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def memory_bytes() -> int:
    """Physical memory, or the container's (cgroup v2 or v1) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in _CGROUP_LIMITS:
        with contextlib.suppress(OSError, ValueError):  # no cgroup file, or "max"
            total = min(total, int(Path(name).read_text()))
    return total


def default_budget_bytes() -> int:
    """A quarter of :func:`memory_bytes`, at most 8 GiB."""
    return min(memory_bytes() // 4, _MAX_DEFAULT)


def decode_factor(transfer_syntax: str) -> int:
    """Peak memory of rendering a frame of this transfer syntax, in decoded frame sizes."""
    uid = UID(transfer_syntax)
    if uid.is_transfer_syntax and not uid.is_compressed:
        return _FACTORS["native"]
    return _FACTORS.get(uid, DECODE_FACTOR)


def decode_claim(study: Study, config: PreprocessConfig) -> int:
    """Bytes rendering ``study``'s key images may hold at once, from its headers: for the
    largest of its instances (they are rendered one after another), the object read whole
    plus :func:`decode_factor` × the decoded frames the key-image rule shows of it; for a
    montage of a series, also its tiles (8-bit, at most a frame each) until they are
    joined. A frame above ``MAX_FRAME_BYTES`` is refused before decoding and costs nothing."""
    rule = parse_rule(config.key_images)
    shown = rule.count  # frames of one object: 1, N, or R×C
    copies = [c for i in study.instances for c in i.copies]  # any copy may be the one read
    frame = [c.frame_bytes if c.frame_bytes <= MAX_FRAME_BYTES else 0 for c in copies]
    claim = max(
        inst.ref.size + decode_factor(inst.transfer_syntax) * f * min(inst.frames, shown)
        for inst, f in zip(copies, frame, strict=True)
    )
    if rule.kind == "montage" and len(study.instances) > 1:
        claim += shown * max(frame)
    return claim


class DecodeBudget:
    """Bytes of decoding memory shared by every study this process renders, whatever event
    loop or thread awaits them. Studies are admitted in the order they ask; one whose claim
    is larger than the whole budget runs alone rather than never."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Studies waiting for room."""
        return len(self._queue)

    def _fits(self, nbytes: int) -> bool:
        return self.held == 0 or self.held + nbytes <= self.limit

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Wait until ``nbytes`` fit, and hold them for the body of the ``async with``."""
        loop = asyncio.get_running_loop()
        with self._lock:
            admitted = not self._queue and self._fits(nbytes)
            if admitted:
                self.held += nbytes
            else:
                entry = (nbytes, loop, loop.create_future())
                self._queue.append(entry)
        if not admitted:
            logger.debug("%d MiB of decoding waits for the budget", nbytes >> 20)
            try:
                await entry[2]
            except asyncio.CancelledError:
                with self._lock:
                    granted = entry not in self._queue
                    if granted:  # admitted while being cancelled: give the bytes back
                        self.held -= nbytes
                    else:
                        self._queue.remove(entry)
                    self._grant()
                raise
        try:
            yield
        finally:
            with self._lock:
                self.held -= nbytes
                self._grant()

    def _grant(self) -> None:
        """Admit waiting studies, first come first, while the next one fits (lock held)."""
        while self._queue and self._fits(self._queue[0][0]):
            nbytes, loop, future = self._queue.popleft()
            if not loop.is_closed():  # else its run is gone, and its waiter with it
                self.held += nbytes
                loop.call_soon_threadsafe(_admit, future)


def _admit(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled meanwhile: its waiter gives the bytes back
        future.set_result(None)


_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def decode_budget(runner: RunnerConfig) -> DecodeBudget:
    """The process's budget of ``runner.decode_memory_mib`` (else the default): one per
    size, shared by every run of this process that asks for that size."""
    limit = (
        runner.decode_memory_mib * 2**20
        if runner.decode_memory_mib is not None
        else default_budget_bytes()
    )
    with _budgets_lock:
        return _budgets.setdefault(limit, DecodeBudget(limit))
