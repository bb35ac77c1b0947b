"""Shard manifests: a shard's studies round-trip through DEST as discovery found them, and a
missing, stale or foreign manifest is one clear error naming it."""

from __future__ import annotations

import json

import pytest

from simulator.samples import synthetic_ct
from tasks.core.errors import ConfigError
from tasks.ingest.discover import discover_studies
from tasks.screening.manifest import manifest_key, read_manifest, write_manifest
from tasks.storage import LocalStore


def test_a_manifest_carries_the_studies_without_a_second_header_read(tmp_path):
    src = LocalStore(tmp_path / "in")
    for i in range(3):
        synthetic_ct(tmp_path / "in" / f"{i}.dcm", lesion=False, seed=40 + i, size=32)
    dest = LocalStore(tmp_path / "out")
    found = discover_studies(src)
    assert found.header_reads == 3 and len(found.studies) == 3

    key = write_manifest(dest, "run-1", 0, src, found.studies)

    assert key == manifest_key("run-1", 0) == "shards/run-1/0001.json"
    again = read_manifest(dest, key, src)
    assert [s.study_instance_uid for s in again] == [s.study_instance_uid for s in found.studies]
    assert [s.fingerprint for s in again] == [s.fingerprint for s in found.studies]
    first, copy = found.studies[0].instances[0], again[0].instances[0]
    assert (copy.ref, copy.header, copy.frame_bytes) == (first.ref, first.header, first.frame_bytes)
    # the patients' keyed hashes stay in the process that made them
    assert "patient" not in (tmp_path / "out" / key).read_text()


def test_a_missing_or_foreign_manifest_is_one_clear_error(tmp_path):
    src, dest = LocalStore(tmp_path / "in"), LocalStore(tmp_path / "out")
    with pytest.raises(ConfigError, match='shard manifest "shards/x/0001.json" .* does not exist'):
        read_manifest(dest, "shards/x/0001.json", src)
    write_manifest(dest, "x", 1, LocalStore(tmp_path / "elsewhere"), [])
    with pytest.raises(ConfigError, match="lists the studies of another source"):
        read_manifest(dest, "shards/x/0002.json", src)
    (tmp_path / "out" / "shards" / "x" / "0002.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ConfigError, match="has version 0, not 1"):
        read_manifest(dest, "shards/x/0002.json", src)
