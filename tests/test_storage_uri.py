"""The one URI splitter (tasks.storage.split_uri): a file's store root and key, for every
caller that reads one named file (labels, annotations, reliability.json)."""

from __future__ import annotations

import json

import pytest

from tasks.consensus.reliability import load_reliability
from tasks.core.errors import ConfigError, StorageError
from tasks.storage import open_store, split_uri


@pytest.mark.parametrize(
    ("uri", "root", "key"),
    [
        ("s3://bucket/ft/labels.jsonl", "s3://bucket/ft", "labels.jsonl"),
        ("s3://bucket/labels.csv", "s3://bucket", "labels.csv"),
        ("s3://bucket/a/b/labels.csv/", "s3://bucket/a/b", "labels.csv"),
        ("/data/labels.csv", "/data", "labels.csv"),
        ("/labels.csv", "/", "labels.csv"),
        ("labels.csv", ".", "labels.csv"),
        ("./labels.csv", ".", "labels.csv"),
        ("runs/x/labels.csv", "runs/x", "labels.csv"),
        ("runs/x/labels.csv//", "runs/x", "labels.csv"),
        ("with space/ünï 환자.csv", "with space", "ünï 환자.csv"),
    ],
)
def test_split_uri_gives_the_store_root_and_the_key(uri, root, key):
    assert split_uri(uri) == (root, key)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "names no file"),
        ("/", "names no file"),
        ("s3://bucket", "names no file"),
        ("s3://bucket/", "names no file"),
        ("s3:///labels.csv", "names no file"),
        ("data/..", "names no file"),
        ("http://host/labels.csv", "neither an s3:// URI nor a local path"),
        ("dicomweb+http://pacs/labels.csv", "neither an s3:// URI nor a local path"),
    ],
)
def test_split_uri_names_a_uri_without_a_file(uri, reason):
    with pytest.raises(StorageError, match=reason) as info:
        split_uri(uri)
    assert f'"{uri}"' in str(info.value)


def test_a_file_at_the_root_of_the_filesystem_is_read_there_not_in_the_working_dir(
    tmp_path, monkeypatch
):
    """``/labels.csv`` once resolved to ``./labels.csv`` in one of the two splitters."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reliability.json").write_text(json.dumps({"models": {"a": {"weight": 9}}}))
    absolute = str(tmp_path / "reliability.json")
    root, key = split_uri(absolute)
    assert open_store(root).read_bytes(key) == (tmp_path / "reliability.json").read_bytes()
    assert load_reliability(absolute) == {"a": 9.0}
    with pytest.raises(ConfigError, match='"/reliability.json" does not exist'):
        load_reliability("/reliability.json")
