"""`radflow bridge --orthanc URL`: Orthanc's change feed (``GET /changes``) → one
``radflow.study.ready`` event per study that became stable (Orthanc's own rule: no new
instance for ``StableAge`` seconds), naming the study as a DICOMweb source.

Restart-safe: the cursor (the last change handled) and what each study held when it was last
announced are kept in a state file, written atomically after each announced study, so a
restart neither repeats a study nor misses one. A study is announced again only when its
instances changed (radflow's own SR series, published back, does not count)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tasks.core.errors import ConfigError, ObjectMissing, RadflowError
from tasks.ingest.events import STUDY_READY
from tasks.pacs.dicomweb import SCHEME, UID, PacsClient
from tasks.pacs.settings import DicomWebConfig
from tasks.reports.sr import sr_series_uid

__all__ = ["BridgeState", "OrthancBridge", "orthanc_study_event"]

logger = logging.getLogger("radflow.bridge.orthanc")

_EVENT_NAMESPACE = uuid.UUID("0b7a52c4-7a1f-4c55-9a57-5f0e2d6c1e11")
_REMEMBER = 100_000  # studies whose last announced content is kept in the state file


@dataclass
class BridgeState:
    """What survives a restart: Orthanc's change sequence number handled last, and per
    StudyInstanceUID the fingerprint of the instances last announced."""

    orthanc: str
    last: int = 0
    studies: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @classmethod
    def load(cls, path: Path, orthanc: str) -> BridgeState | None:
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text("utf-8"))
            state = cls(doc["orthanc"], int(doc["last"]), OrderedDict(doc["studies"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f'bridge state "{path}" is unreadable: {exc}',
                hint="move it aside to start again from Orthanc's current change",
            ) from None
        if state.orthanc != orthanc:
            raise ConfigError(
                f'bridge state "{path}" is for {state.orthanc}, not {orthanc}',
                hint="give each Orthanc its own --state file",
            )
        return state

    def save(self, path: Path) -> None:
        """Atomically (temp file + rename): a crash leaves the old state or the new one."""
        while len(self.studies) > _REMEMBER:
            self.studies.popitem(last=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"orthanc": self.orthanc, "last": self.last, "studies": self.studies}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-bridge-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def orthanc_study_event(
    source_root: str, orthanc: str, study: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """The ``radflow.study.ready`` event of one stable study: its resource is the study as a
    DICOMweb resource, and ``payload.source`` the screening flow's SOURCE for exactly it."""
    uid = study["uid"]
    return {
        "id": str(uuid.uuid5(_EVENT_NAMESPACE, f"{orthanc}\n{uid}\n{fingerprint}")),
        "event": STUDY_READY,
        "resource": {
            "prefect.resource.id": f"{source_root}/studies/{uid}",
            "prefect.resource.name": uid,
            "radflow.orthanc": orthanc,
        },
        "payload": {
            "source": f"{source_root}?StudyInstanceUID={uid}",
            "study_instance_uid": uid,
            "orthanc_id": study["id"],
            "instances": study["instances"],
            "change_seq": study["seq"],
            "stable_at": study["date"],
        },
    }


class OrthancBridge:
    """Follows one Orthanc's change feed; see the module docstring."""

    def __init__(
        self,
        orthanc: str,
        state_path: str | Path,
        config: DicomWebConfig,
        *,
        dicomweb_root: str = "/dicom-web",
        start: str = "now",
        page: int = 100,
    ) -> None:
        parts = urlsplit(orthanc)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f'"{orthanc}" is not an Orthanc URL (http(s)://HOST:PORT)')
        if parts.username or parts.password:
            raise ConfigError("the Orthanc URL must not hold credentials; use dicomweb.auth")
        self.orthanc = orthanc.rstrip("/")
        self.source_root = SCHEME + self.orthanc + "/" + dicomweb_root.strip("/")
        self.state_path = Path(state_path)
        self.client = PacsClient(self.orthanc, config)
        self.page = page
        self.start = start
        self.events = 0
        self.state = BridgeState.load(self.state_path, self.orthanc)

    def _get(self, what: str, path: str, **params: Any) -> Any:
        return self.client.get_json(what, f"{self.orthanc}{path}", params or None)

    def _begin(self) -> BridgeState:
        """A first start: from Orthanc's latest change (``now``) or from its oldest (``0``)."""
        last = 0
        if self.start == "now":
            last = int(self._get("Orthanc change feed", "/changes", last="").get("Last", 0))
        state = BridgeState(self.orthanc, last)
        state.save(self.state_path)
        logger.info("bridge state %s created at change %d", self.state_path, last)
        return state

    def _study(self, orthanc_id: str) -> dict[str, Any] | None:
        """The study's UID and a fingerprint of its instances (radflow's SR series left out);
        None when it was deleted meanwhile."""
        try:
            study = self._get("Orthanc study", f"/studies/{orthanc_id}")
            series = self._get("Orthanc study series", f"/studies/{orthanc_id}/series")
        except ObjectMissing:
            return None
        uid = str((study.get("MainDicomTags") or {}).get("StudyInstanceUID", ""))
        if len(uid) > 64 or not UID.match(uid):
            logger.warning("Orthanc study %s has no valid StudyInstanceUID; skipped", orthanc_id)
            return None
        ours = sr_series_uid(uid)
        instances = sorted(
            str(i)
            for s in series
            if isinstance(s, dict)
            and (s.get("MainDicomTags") or {}).get("SeriesInstanceUID") != ours
            for i in s.get("Instances") or []
        )
        digest = hashlib.sha256("\n".join(instances).encode()).hexdigest()[:32]
        return {"id": orthanc_id, "uid": uid, "instances": len(instances), "fingerprint": digest}

    def poll(self, emit: Callable[[dict[str, Any]], None]) -> bool:
        """Handle one page of changes; True when Orthanc has no more right now. The cursor
        moves past a StableStudy only once its event was accepted (``emit`` returned)."""
        if self.state is None:
            self.state = self._begin()
        state = self.state
        feed = self._get("Orthanc change feed", "/changes", since=state.last, limit=self.page)
        changes = feed.get("Changes") if isinstance(feed, dict) else None
        if not isinstance(changes, list):
            raise RadflowError(f"{self.orthanc}/changes: not an Orthanc change feed")
        if not changes and int(feed.get("Last", state.last) or 0) < state.last:
            logger.warning(
                "Orthanc's last change is %s, before the cursor %d: its database was reset; "
                "starting again from its first change",
                feed.get("Last"),
                state.last,
            )
            state.last = 0
            state.save(self.state_path)
            return False
        for change in changes:
            seq = int(change.get("Seq", 0))
            if seq <= state.last:
                continue
            if change.get("ChangeType") == "StableStudy":
                self._announce(change, seq, emit)
            state.last = seq
        if changes:
            state.save(self.state_path)
        return bool(feed.get("Done", True))

    def _announce(self, change: dict[str, Any], seq: int, emit: Callable) -> None:
        assert self.state is not None
        study = self._study(str(change.get("ID", "")))
        if study is None:
            return
        uid, fingerprint = study["uid"], study["fingerprint"]
        if self.state.studies.get(uid) == fingerprint:
            logger.info("study %s stable again with the same instances: not announced", uid)
            return
        study |= {"seq": seq, "date": str(change.get("Date", ""))}
        event = orthanc_study_event(self.source_root, self.orthanc, study, fingerprint)
        emit(event)  # raises when not accepted: the cursor stays before this change
        self.events += 1
        self.state.studies.pop(uid, None)
        self.state.studies[uid] = fingerprint
        self.state.last = seq
        self.state.save(self.state_path)
        logger.info(
            "study %s stable (%d instances, change %d) → event %s",
            uid,
            study["instances"],
            seq,
            event["id"],
        )

    def run(
        self,
        emit: Callable[[dict[str, Any]], None],
        poll_seconds: float = 1.0,
        stop: threading.Event | None = None,
    ) -> int:
        """Follow the feed until ``stop`` is set; an unreachable Orthanc or Prefect API is
        retried every ``poll_seconds`` (at least 1 s). Returns the events emitted."""
        stop = stop or threading.Event()
        logger.info("following %s/changes (state %s)", self.orthanc, self.state_path)
        while not stop.is_set():
            try:
                done = self.poll(emit)
            except (RadflowError, OSError, httpx.HTTPError) as exc:  # emit's too
                logger.warning("%s; retrying", exc)
                stop.wait(max(1.0, poll_seconds))
                continue
            if done:
                stop.wait(poll_seconds)
        return self.events
