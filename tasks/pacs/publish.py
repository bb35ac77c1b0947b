"""Publishing back: each study's report.sr.dcm goes by STOW-RS to a DICOMweb server as radflow's
SR series of the original study. The SR's SOPInstanceUID comes from (study, report version),
so a rerun or a retry stores nothing twice; a report that says something new is a new
instance of the series that names the earlier ones as its predecessors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydicom

from tasks.core.errors import ConfigError, ObjectMissing, PacsError, RadflowError
from tasks.core.schema import Published
from tasks.pacs.dicomweb import UID, PacsClient, is_dicomweb, parse_dicomweb_uri
from tasks.pacs.settings import DicomWebConfig
from tasks.pacs.version import report_version
from tasks.reports.sr import sr_uids

if TYPE_CHECKING:
    from tasks.core.config import Settings
    from tasks.core.schema import Report, RunSummary

__all__ = [
    "PublishTarget",
    "check_pacs_settings",
    "needs_publishing",
    "pacs_line",
    "publish_sr",
    "publish_target",
    "unpublished",
]

logger = logging.getLogger(__name__)

_clients: dict[str, PacsClient] = {}  # one session per target and settings in a process


@dataclass(frozen=True)
class PublishTarget:
    """Where SRs go: a DICOMweb root (``dicomweb+http(s)://HOST:PORT/PATH``) and its access."""

    uri: str
    config: DicomWebConfig

    @property
    def base_url(self) -> str:
        return self.uri.removeprefix("dicomweb+")

    def client(self) -> PacsClient:
        key = f"{self.uri}\n{self.config.model_dump_json()}"
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = PacsClient(self.base_url, self.config, retry=False)
        return client


def publish_target(settings: Settings, source: str | None) -> PublishTarget | None:
    """The configured target, or None; a ConfigError when it cannot be one. ``same`` is the
    run's source when that is a PACS, and nothing otherwise: one config serves the nightly
    run of a bucket and the on-pacs runs of a PACS."""
    value = settings.publish.dicomweb
    if not value:
        return None
    if value.strip().lower() == "same":
        if not is_dicomweb(source):
            logger.info(
                "publish: same, and the source %s is not a PACS: nothing to publish", source
            )
            return None
        return PublishTarget(parse_dicomweb_uri(str(source)).root_uri, settings.dicomweb)
    parsed = parse_dicomweb_uri(value)
    if parsed.filters or parsed.limit is not None:
        raise ConfigError(f'publish.dicomweb "{value}": a publish target takes no query')
    return PublishTarget(parsed.root_uri, settings.dicomweb)


def check_pacs_settings(settings: Settings, source: str | None, out: str | None) -> None:
    """Fail fast (a ConfigError) on a DICOMweb DEST or a publish target that cannot be."""
    if is_dicomweb(out):
        raise ConfigError(
            f'DEST "{out}" is a DICOMweb server: reports go to a folder or s3://',
            hint="send the SRs to the PACS with publish: {dicomweb: same} (or its URL)",
        )
    publish_target(settings, source)


def pacs_line(summary: RunSummary) -> str:
    """One line on what the source sent and what was published (the CLI prints it)."""
    per_study = summary.fetched_bytes / max(1, len(summary.fetched_bytes_by_study))
    line = (
        f"fetched {summary.fetched_bytes / 2**20:.2f} MiB of source instances "
        f"({per_study / 2**10:.0f} KiB per study read)"
    )
    if summary.discovery_bytes:
        line += f", {summary.discovery_bytes / 2**10:.0f} KiB of searches and metadata"
    if summary.published or summary.publish_failed:
        line += f"; {summary.published} SRs published, {len(summary.publish_failed)} failed"
    return line


def needs_publishing(previous: dict[str, Any], target: PublishTarget | None) -> bool:
    """Whether a study reported before still has to be published to ``target``: its SR
    failed to go, or went elsewhere, or publishing was configured since."""
    if target is None:
        return False
    published = previous.get("published") or {}
    return published.get("target") != target.uri or published.get("state") == "failed"


def unpublished(target: PublishTarget, report: Report, reason: str) -> Published:
    """The ``failed`` state of a study whose SR could not even be built."""
    series, sop = sr_uids(report)
    return Published(
        state="failed",
        target=target.uri,
        series_instance_uid=series,
        sop_instance_uid=sop,
        version=report_version(report),
        error=reason,
    )


def _earlier(client: PacsClient, url: str, study: str, series: str) -> list[pydicom.Dataset]:
    """radflow's SRs already in the study on the target (QIDO-RS), oldest first."""
    try:
        found = client.call(
            "QIDO-RS search of radflow SRs",
            url,
            client.web.search_for_instances,
            study_instance_uid=study,
            series_instance_uid=series,
            fields=["SOPClassUID", "SOPInstanceUID", "InstanceNumber"],
        )
    except ObjectMissing:  # servers answer 404 for a series they do not have
        return []
    if not isinstance(found, list):
        raise PacsError(f"QIDO-RS search at {url}: the answer is not a JSON array")
    out = []
    for item in found:
        if not isinstance(item, dict):
            continue
        sop = str(((item.get("00080018") or {}).get("Value") or [""])[0])
        if len(sop) > 64 or not UID.match(sop):
            continue
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.SOPClassUID = str(((item.get("00080016") or {}).get("Value") or [""])[0]) or (
            pydicom.uid.ComprehensiveSRStorage
        )
        number = ((item.get("00200013") or {}).get("Value") or [0])[0]
        ds.InstanceNumber = number if isinstance(number, int) and 0 < number < 2**31 else 0
        out.append(ds)
    return sorted(out, key=lambda ds: (ds.InstanceNumber, ds.SOPInstanceUID))


def _stow(client: PacsClient, url: str, study: str, sr: pydicom.Dataset) -> tuple[int, str | None]:
    """STOW-RS the SR, retrying transient failures; (attempts, error or None)."""
    config = client.config
    error = None
    for attempt in range(1, config.max_attempts + 1):
        try:
            answer = client.call(
                "STOW-RS", url, client.web.store_instances, [sr], study_instance_uid=study
            )
        except RadflowError as exc:
            error = str(exc)
            if not getattr(exc, "transient", False) or attempt == config.max_attempts:
                return attempt, error
            time.sleep(config.retry_wait_ms / 1000 * 2 ** (attempt - 1))
            continue
        failed = [
            f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
            f"0x{int(item.get('FailureReason', 0) or 0):04X}"
            for item in answer.get("FailedSOPSequence", [])
        ]
        if failed:
            return attempt, f"STOW-RS to {url} failed: {'; '.join(failed)} (PS3.18 Table I.2-1)"
        return attempt, None
    return config.max_attempts, error


def publish_sr(
    target: PublishTarget,
    report: Report,
    build: Callable[[Sequence[pydicom.Dataset], int], pydicom.Dataset],
) -> tuple[pydicom.Dataset, Published]:
    """Build the study's SR with ``build(previous, instance_number)`` and store it on the
    target, unless that version is there already. Never raises for the server's failures:
    they are the returned ``Published`` state (``failed``, with the reason), and a rerun
    tries again."""
    study = report.study_instance_uid
    series, sop = sr_uids(report)
    record = {
        "target": target.uri,
        "series_instance_uid": series,
        "sop_instance_uid": sop,
        "version": report_version(report),
    }
    client = target.client()
    url = f"{target.base_url}/studies/{study}"
    try:
        earlier = _earlier(client, f"{url}/series/{series}/instances", study, series)
    except RadflowError as exc:
        logger.warning("study %s: SR not published: %s", study, exc)
        return build([], 1), Published(state="failed", error=str(exc), **record)
    mine = next((ds for ds in earlier if ds.SOPInstanceUID == sop), None)
    if mine is not None:
        previous = [ds for ds in earlier if ds.InstanceNumber < mine.InstanceNumber]
        number = int(mine.InstanceNumber) or 1
    else:
        previous = earlier
        number = max((int(ds.InstanceNumber) for ds in earlier), default=0) + 1
    sr = build(previous, number)
    record |= {"instance_number": number, "supersedes": [ds.SOPInstanceUID for ds in previous]}
    if mine is not None:
        return sr, Published(state="already_stored", **record)
    attempts, error = _stow(client, f"{target.base_url}/studies", study, sr)
    if error is not None:
        logger.warning("study %s: SR not published after %d attempts: %s", study, attempts, error)
        return sr, Published(state="failed", attempts=attempts, error=error, **record)
    logger.info("study %s: SR %s stored on %s (instance %d)", study, sop, target.uri, number)
    return sr, Published(state="stored", attempts=attempts, **record)
