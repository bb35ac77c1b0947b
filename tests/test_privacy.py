"""Log pseudonyms: DEST's key is made once and kept, a log id maps back to its study only with
that key (`radflow lookup`), and a damaged key is one clear error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.core.config import PrivacyConfig
from tasks.core.errors import ConfigError
from tasks.core.privacy import KEY_NAME, LogNames, find_studies, load_key, log_names, store_scheme
from tasks.storage import LocalStore

UIDS = ["1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"]


def _dest(tmp_path) -> LocalStore:
    dest = LocalStore(tmp_path / "out")
    for uid in UIDS:
        dest.write_bytes(f"studies/{uid}/report.json", b"{}")
    dest.write_bytes(f"studies/{UIDS[0]}/report.md", b"")
    return dest


def test_the_key_is_made_once_per_dest_and_names_are_stable(tmp_path):
    dest = _dest(tmp_path)
    first = log_names(dest, PrivacyConfig())
    again = log_names(LocalStore(tmp_path / "out"), PrivacyConfig())  # a later run
    assert first.key and first == again and len(first.key) == 32
    other = log_names(LocalStore(tmp_path / "elsewhere"), PrivacyConfig())
    assert other.study(UIDS[0]) != first.study(UIDS[0])  # another DEST, another key
    assert json.loads(dest.read_bytes(KEY_NAME))["key"] == first.key.hex()
    assert log_names(dest, PrivacyConfig(log_uids="plain")) == LogNames()
    assert LogNames().study(UIDS[0]) == UIDS[0] and LogNames().source("/in") == "/in"
    assert [store_scheme(u) for u in ("s3://b/p", "/data/in", None)] == ["s3", "local", "config"]


def test_a_log_id_maps_back_only_with_the_key(tmp_path):
    dest = _dest(tmp_path)
    names = log_names(dest, PrivacyConfig())
    ids = [names.study(u) for u in UIDS]
    found = find_studies(LocalStore(tmp_path / "out" / "studies"), names, [*ids, "0" * 16])
    assert found == dict(zip(ids, UIDS, strict=True))
    result = CliRunner().invoke(app, ["lookup", str(tmp_path / "out"), ids[1]])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [ids[1], UIDS[1], f"{tmp_path}/out/studies/{UIDS[1]}/report.md"]
    missing = CliRunner().invoke(app, ["lookup", str(tmp_path / "out"), ids[0], "0" * 16])
    assert missing.exit_code == 1 and "not found" in missing.output and UIDS[0] in missing.output


def test_a_missing_or_damaged_key_is_one_clear_error(tmp_path):
    dest = _dest(tmp_path)
    with pytest.raises(ConfigError, match="has no privacy/log-key.json"):
        load_key(dest, create=False)
    result = CliRunner().invoke(app, ["lookup", str(tmp_path / "out"), "abc"])
    assert result.exit_code == 2 and "has no privacy/log-key.json" in result.output
    dest.write_bytes(KEY_NAME, b'{"key": "not hex"}')
    with pytest.raises(ConfigError, match="is not a radflow log key"):
        load_key(dest)
    dest.write_bytes(KEY_NAME, b'{"key": "abcd"}')
    with pytest.raises(ConfigError, match="shorter than 16 bytes"):
        load_key(dest)


def test_runs_that_start_at_once_on_a_new_dest_share_one_key(tmp_path):
    """8 threads at a barrier, each with its own store of one new DEST (as 8 runs would),
    10 times: the first key written wins (a conditional create) and every one reads it."""
    import threading

    for round_ in range(10):
        barrier = threading.Barrier(8)
        keys: list[bytes] = []

        def run(folder=tmp_path / f"fresh-{round_}", barrier=barrier, keys=keys) -> None:
            store = LocalStore(folder)
            barrier.wait()
            keys.append(load_key(store))

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(keys) == 8 and len(set(keys)) == 1, (round_, len(set(keys)))
