"""Header-only discovery and grouping into studies and series."""

from __future__ import annotations

import shutil

import pytest
from pydicom.data import get_testdata_file

from simulator.samples import synthetic_ct
from tasks.core.errors import StorageError
from tasks.ingest.discover import discover_studies
from tasks.storage import LocalStore


def test_groups_by_study_and_series_with_odd_names(tmp_path):
    study, series = "1.2.3.4", "1.2.3.4.1"
    for i in range(3):
        synthetic_ct(
            tmp_path / f"a b/ü {i}%.dcm",
            lesion=False,
            seed=i,
            study_uid=study,
            series_uid=series,
            instance=i + 1,
        )
    synthetic_ct(tmp_path / "other.dcm", lesion=True, seed=9)
    inv = discover_studies(LocalStore(tmp_path))
    assert inv.errors == []
    assert sorted(len(s.instances) for s in inv.studies) == [1, 3]
    big = next(s for s in inv.studies if s.study_instance_uid == study)
    assert list(big.series) == [series]
    assert [i.instance_number for i in big.instances] == [1, 2, 3]


def test_non_dicom_and_empty_become_error_records_and_a_copy_an_alternate(tmp_path):
    synthetic_ct(tmp_path / "one.dcm", lesion=False, seed=1)
    shutil.copyfile(tmp_path / "one.dcm", tmp_path / "one copy.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("hello")
    shutil.copyfile(get_testdata_file("rtplan.dcm", download=False), tmp_path / "plan.dcm")
    inv = discover_studies(LocalStore(tmp_path))
    kinds = sorted((r.kind, r.source.rsplit("/", 1)[-1]) for r in inv.errors)
    assert kinds == [
        ("NotDicom", "empty.dcm"),
        ("NotDicom", "readme.txt"),
        ("UnsupportedImage", "plan.dcm"),
    ]
    assert len(inv.studies) == 1 and len(inv.studies[0].instances) == 1
    # the copy waits as an alternate: tests/test_identity.py follows it through preprocessing
    (instance,) = inv.studies[0].instances
    assert [c.ref.key for c in instance.copies] == ["one copy.dcm", "one.dcm"]


def test_fingerprint_changes_when_an_input_changes(tmp_path):
    synthetic_ct(tmp_path / "x.dcm", lesion=False, seed=1)
    before = discover_studies(LocalStore(tmp_path)).studies[0].fingerprint
    synthetic_ct(tmp_path / "x.dcm", lesion=True, seed=1)
    after = discover_studies(LocalStore(tmp_path)).studies[0].fingerprint
    assert before != after


def test_local_store_keys_cannot_leave_the_folder(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.write_bytes("a/../b/report.json", b"{}")
    assert (tmp_path / "root/b/report.json").read_bytes() == b"{}"
    for key in ("../outside.json", "/etc/passwd", "a/../../outside.json", ".", ""):
        with pytest.raises(StorageError, match="escapes the folder"):
            store.write_bytes(key, b"x")
    assert not (tmp_path / "outside.json").exists()
