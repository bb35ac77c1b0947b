"""A shard's plan, written once by the parent run and read by the shard's run instead of listing
the source and reading headers again: ``shards/<parent run id>/<n>.json`` under DEST, with
each study's instances as discovery found them (object keys, sizes, versions, UIDs, frames,
the context tags, copies). The patients' keyed hashes are not written: they are keyed per
process, and the parent has already checked each study's identity with them."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from tasks.core.errors import ConfigError
from tasks.ingest.discover import Instance, Study
from tasks.storage import ObjectRef, Store, read_json

__all__ = ["MANIFEST_VERSION", "manifest_key", "read_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def manifest_key(run_id: str, index: int) -> str:
    """Where shard ``index`` (0-based) of run ``run_id`` has its manifest under DEST."""
    return f"shards/{run_id}/{index + 1:04d}.json"


def _instance(inst: Instance) -> dict[str, Any]:
    ref = inst.ref
    return {
        "uri": ref.uri,
        "key": ref.key,
        "size": ref.size,
        "version": ref.version,
        "study": inst.study_instance_uid,
        "series": inst.series_instance_uid,
        "sop": inst.sop_instance_uid,
        "modality": inst.modality,
        "number": inst.instance_number,
        "frames": inst.frames,
        "header": inst.header,
        "frame_bytes": inst.frame_bytes,
        "transfer_syntax": inst.transfer_syntax,
        "alternates": [_instance(a) for a in inst.alternates],
    }


def _from_dict(d: dict[str, Any]) -> Instance:
    ref = ObjectRef(d["uri"], d["key"], d["size"], d["version"])
    return Instance(
        ref,
        d["study"],
        d["series"],
        d["sop"],
        d["modality"],
        d["number"],
        d["frames"],
        dict(d["header"]),
        d["frame_bytes"],
        d["transfer_syntax"],
        alternates=tuple(_from_dict(a) for a in d["alternates"]),
    )


def write_manifest(
    dest: Store, run_id: str, index: int, source: Store, studies: Sequence[Study]
) -> str:
    """Write shard ``index``'s manifest (its ``studies``, found under ``source``); its key."""
    key = manifest_key(run_id, index)
    body = {
        "version": MANIFEST_VERSION,
        "source": source.uri,
        "studies": [
            {"uid": s.study_instance_uid, "instances": [_instance(i) for i in s.instances]}
            for s in studies
        ],
    }
    dest.write_bytes(key, json.dumps(body, separators=(",", ":")).encode(), "application/json")
    return key


def read_manifest(dest: Store, key: str, source: Store) -> list[Study]:
    """The studies of the manifest at ``key`` under DEST, their objects under ``source``; a
    missing or unreadable manifest, or one written for another source, is a ConfigError
    naming it and the reason."""
    where = f'shard manifest "{key}" under {dest.uri}'
    try:
        body = read_json(dest, key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is unreadable: {exc}") from None
    if body is None:
        raise ConfigError(f"{where} does not exist", hint="the parent run writes it; rerun it")
    if body.get("version") != MANIFEST_VERSION:
        raise ConfigError(f"{where} has version {body.get('version')!r}, not {MANIFEST_VERSION}")
    if body.get("source") != source.uri:
        raise ConfigError(f"{where} lists the studies of another source, not {source.uri}")
    try:
        return [Study(s["uid"], [_from_dict(i) for i in s["instances"]]) for s in body["studies"]]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
