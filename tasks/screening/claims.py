"""Per-study claims: a lease in DEST (``claims/<StudyInstanceUID>.json``) so that one run at a
time reads a study, however many runs screen the same SOURCE into the same DEST.

A claim is taken with a conditional create (S3 ``If-None-Match: *``, a hard link in a folder)
and renewed, taken over or released with a compare-and-swap on the version seen (S3
``If-Match: <ETag>``, a digest compared under a lock in a folder): of runs racing for one
study, exactly one wins. The holder renews its lease every third of ``claim_lease_seconds``
while it reads; a crashed run's claims are taken over once they expire, or at once when the
claim names a process of this host (and PID namespace) that no longer runs. The claim file
is hostile input like any other object: one that does not parse is taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from tasks.core.errors import StorageError, StorageUnavailable
from tasks.storage import Store

__all__ = ["Claim", "Lease", "claim_key", "kept", "take"]

logger = logging.getLogger(__name__)

CLAIMS_PREFIX = "claims"
_ROUNDS = 4  # create / take over attempts before giving up on a claim that keeps changing


def claim_key(uid: str) -> str:
    return f"{CLAIMS_PREFIX}/{uid}.json"


def _host() -> str:
    """This host and PID namespace: where a claim's PID can be checked."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


_HOST = _host()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Lease(BaseModel):
    """What ``claims/<uid>.json`` holds: who holds the study, until when."""

    run_id: str = Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="the holding run")
    token: str = Field(pattern=r"^[0-9a-f]{32}$", description="this claim's own id")
    host: str = Field(max_length=300, description="hostname/PID namespace of the holder")
    pid: int = Field(gt=0, le=2**22, description="the holder's process id")
    acquired_at: AwareDatetime
    expires_at: AwareDatetime

    def describe(self) -> str:
        expires = self.expires_at.astimezone(UTC)
        return f"claimed by run {self.run_id} (expires at {expires:%Y-%m-%dT%H:%M:%SZ})"

    def stale(self, now: datetime) -> bool:
        """Expired, or held by a process of this host that no longer runs."""
        return now >= self.expires_at or (self.host == _HOST and not _running(self.pid))


def _parse(data: bytes, name: str) -> Lease | None:
    try:
        return Lease.model_validate_json(data)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        logger.warning("the claim of study %s is unreadable, taking it over: %s", name, reason)
        return None


@dataclass
class Claim:
    """A lease this run holds: :meth:`renew` it while reading, :meth:`release` it after."""

    store: Store
    key: str
    name: str  # how logs name the study (tasks.core.privacy)
    lease: Lease
    version: str
    seconds: float
    lost: str | None = None  # who holds it now, once another run took it over
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _swap(self, lease: Lease | None) -> bool:
        """Replace (with None: delete) our claim object if it is still ours. A write that S3
        applied but whose answer was lost (botocore then retried it) is known by its token."""
        for _ in range(_ROUNDS):
            if lease is None:
                if self.store.delete_if(self.key, self.version):
                    return True
            elif version := self.store.put_if(self.key, _dump(lease), self.version):
                self.lease, self.version = lease, version
                return True
            current = self.store.read_versioned(self.key)
            if current is None and lease is None:
                return True  # gone: our delete, answered late
            other = _parse(current[0], self.name) if current else None
            if other is None or other.token != self.lease.token:
                self.lost = other.describe() if other else "deleted or overwritten"
                return False
            self.lease, self.version = other, current[1]  # ours, at a version we did not see
        raise StorageUnavailable(f"the claim of study {self.name} kept changing under its holder")

    def renew(self) -> bool:
        """Extend the lease by ``seconds`` from now; False when another run took it over."""
        with self._lock:
            if self.lost is not None:
                return False
            expires = datetime.now(UTC) + timedelta(seconds=self.seconds)
            return self._swap(self.lease.model_copy(update={"expires_at": expires}))

    def held(self) -> bool:
        """Whether the claim is still ours with at least half a lease to run (renewed now
        if the keeper fell behind): checked before the study's report is written."""
        remaining = (self.lease.expires_at - datetime.now(UTC)).total_seconds()
        return self.lost is None and (remaining >= self.seconds / 2 or self.renew())

    def release(self) -> None:
        """Delete the claim if it is still ours (once the study is reported, or failed)."""
        with self._lock:
            if self.lost is None and not self._swap(None):
                logger.warning(
                    "study %s: its claim was %s before its release", self.name, self.lost
                )


def _dump(lease: Lease) -> bytes:
    return lease.model_dump_json().encode()


def take(store: Store, uid: str, run_id: str, seconds: float, name: str = "") -> Claim | Lease:
    """Claim study ``uid`` for ``run_id`` for ``seconds``: our :class:`Claim`, or the
    :class:`Lease` of the live run that holds it. ``name``: the study's log id."""
    name = name or uid
    key = claim_key(uid)
    now = datetime.now(UTC)
    mine = Lease(
        run_id=run_id,
        token=uuid.uuid4().hex,
        host=_HOST,
        pid=os.getpid(),
        acquired_at=now,
        expires_at=now + timedelta(seconds=seconds),
    )
    version: str | None = None  # None: create; else take over the object at this version
    for _ in range(_ROUNDS):
        won = store.put_if(key, _dump(mine), version, "application/json")
        if won:
            return Claim(store, key, name, mine, won, seconds)
        current = store.read_versioned(key)
        if current is None:
            version = None  # released meanwhile: create it
            continue
        data, version = current
        other = _parse(data, name)
        if other is not None and other.token == mine.token:  # our write, answered late
            return Claim(store, key, name, other, version, seconds)
        if other is not None and not other.stale(datetime.now(UTC)):
            return other
        if other is not None:
            logger.info("study %s: taking over the stale claim of run %s", name, other.run_id)
    raise StorageUnavailable(f"the claim of study {name} kept changing: {_ROUNDS} races lost")


@contextlib.asynccontextmanager
async def kept(claim: Claim) -> AsyncIterator[Claim]:
    """Renew ``claim`` every third of its lease while the block runs; release it after
    (also when the block fails or is cancelled)."""

    async def renew() -> None:
        while claim.lost is None:
            await asyncio.sleep(claim.seconds / 3)
            try:
                if not await asyncio.to_thread(claim.renew):
                    logger.warning("study %s: claim lost, %s", claim.name, claim.lost)
            except StorageError as exc:  # the lease still runs; the next round tries again
                logger.warning("study %s: claim not renewed: %s", claim.name, exc)

    keeper = asyncio.ensure_future(renew())
    try:
        yield claim
    finally:
        keeper.cancel()
        await asyncio.to_thread(claim.release)
