"""Symlinks in a local SOURCE or DEST: nothing is read or written through a symlink that
leads out of the folder (one SymlinkEscape naming the key); symlinks that stay inside work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from simulator.samples import synthetic_ct
from tests.helpers import read_reports, run_screen, sim_calls, sim_config

UID = "1.2.826.0.1.3680043.8.498.1"


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("link", "key"),
    [
        ("studies", f"studies/{UID}/report.json"),
        (f"studies/{UID}", f"studies/{UID}/report.json"),
        (f"studies/{UID}/images", f"studies/{UID}/images/0123.png"),
        ("errors", "errors/0123.json"),
        ("claims", f"claims/{UID}.json"),
    ],
)
def test_a_write_through_a_symlink_leading_out_of_dest_fails_naming_the_key(tmp_path, link, key):
    from tasks.core.errors import StorageError
    from tasks.storage import LocalStore

    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    (dest / link).parent.mkdir(parents=True)
    (dest / link).symlink_to(outside, target_is_directory=True)
    store = LocalStore(dest)
    with pytest.raises(StorageError) as err:
        if key.startswith("claims/"):
            store.put_if(key, b"{}", None)  # a claim: the conditional create
        else:
            store.write_bytes(key, b"{}")
    assert _tree(outside) == []  # nothing landed outside DEST
    from tasks.core.errors import SymlinkEscape

    assert isinstance(err.value, SymlinkEscape)
    message = str(err.value)
    assert f'key "{key}"' in message and f'"{link}" is a symlink to "{outside}"' in message
    with pytest.raises(SymlinkEscape):  # and nothing is read through it either
        store.exists(key)


def test_symlinks_inside_dest_are_followed_and_a_symlinked_file_is_replaced(tmp_path):
    from tasks.storage import LocalStore

    dest, outside = tmp_path / "dest", tmp_path / "outside"
    (dest / "real").mkdir(parents=True)
    outside.mkdir()
    (dest / "studies").symlink_to(dest / "real", target_is_directory=True)
    secret = outside / "passwd"
    secret.write_text("root:x:0:0")
    (dest / "real" / "report.json").symlink_to(secret)  # a file symlink leading out
    store = LocalStore(dest)
    store.write_bytes(f"studies/{UID}/report.md", b"# ok")
    assert (dest / "real" / UID / "report.md").read_bytes() == b"# ok"
    store.write_bytes("studies/report.json", b"{}")  # replaces the link, not its target
    assert secret.read_text() == "root:x:0:0"
    assert not (dest / "real" / "report.json").is_symlink()
    (dest / "real" / "report.json").unlink()
    (dest / "real" / "report.json").symlink_to(secret)
    from tasks.core.errors import StorageError

    with pytest.raises(StorageError, match='"studies/report.json" is a symlink to'):
        store.read_bytes("studies/report.json")  # nor is a file outside DEST read


def test_source_symlinks_leading_out_become_error_records(tmp_path):
    from tasks.ingest.discover import discover_studies
    from tasks.storage import LocalStore

    source, outside = tmp_path / "in", tmp_path / "outside"
    synthetic_ct(source / "a" / "good.dcm", lesion=True, seed=1, size=64)
    synthetic_ct(outside / "other patient.dcm", lesion=False, seed=2, size=64)
    synthetic_ct(outside / "folder" / "x.dcm", lesion=False, seed=3, size=64)
    (source / "linked.dcm").symlink_to(outside / "other patient.dcm")
    (source / "linked folder").symlink_to(outside / "folder", target_is_directory=True)
    (source / "same folder").symlink_to(source / "a", target_is_directory=True)  # inside
    (source / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    store = LocalStore(source)
    keys = sorted(ref.key for ref in store.list())
    # the inside folder link is not walked (its file is listed where it is)
    assert keys == ["a/good.dcm", "dangling.dcm", "linked folder", "linked.dcm"]
    inventory = discover_studies(store)
    assert [len(s.instances) for s in inventory.studies] == [1]
    errors = {Path(e.source).name: e for e in inventory.errors}
    assert sorted(errors) == ["dangling.dcm", "linked folder", "linked.dcm"]
    for name in ("linked.dcm", "linked folder", "dangling.dcm"):
        assert errors[name].kind == "SymlinkEscape", errors[name]
        assert f'key "{name}" leads out of the folder' in errors[name].reason


@pytest.mark.e2e
def test_screen_refuses_symlinks_out_of_source_and_dest(prefect_harness, simulator, tmp_path):
    source, outside = tmp_path / "in", tmp_path / "outside"
    synthetic_ct(source / "good.dcm", lesion=True, seed=5, size=64)
    synthetic_ct(source / "linked out.dcm", lesion=False, seed=7, size=64, study_uid=UID)
    synthetic_ct(outside / "other" / "x.dcm", lesion=False, seed=6, size=64)
    (source / "x.dcm").symlink_to(outside / "other" / "x.dcm")
    (source / "more").symlink_to(outside / "other", target_is_directory=True)
    dest = tmp_path / "out"
    (dest / "studies").mkdir(parents=True)  # one study's DEST folder leads out of DEST
    (dest / "studies" / UID).symlink_to(outside / "other", target_is_directory=True)
    config = sim_config(simulator, tmp_path)
    before = sim_calls(simulator)

    def screen(dest: Path) -> subprocess.CompletedProcess:
        return run_screen(source, dest, config, api_url=prefect_harness)

    run = screen(dest)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(read_reports(dest)) == 1  # the good study; the one outside SOURCE is not read
    assert sim_calls(simulator) - before == 2  # … nor the one that could not be written
    assert _tree(outside / "other") == ["x.dcm"]  # nothing written outside DEST
    records = [json.loads(p.read_text()) for p in (dest / "errors").glob("*.json")]
    assert sorted((Path(r["source"]).name, r["kind"], r["stage"]) for r in records) == [
        ("linked out.dcm", "SymlinkEscape", "report"),
        ("more", "SymlinkEscape", "discover"),
        ("x.dcm", "SymlinkEscape", "discover"),
    ]

    # DEST/errors leads out of DEST: the run stops with one line naming the key, writes nothing
    dest2, elsewhere = tmp_path / "out2", tmp_path / "elsewhere"
    dest2.mkdir()
    elsewhere.mkdir()
    (dest2 / "errors").symlink_to(elsewhere, target_is_directory=True)
    stopped = screen(dest2)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and 'key "errors/' in lines[0] and "is a symlink to" in lines[0]
    assert os.listdir(elsewhere) == []
    print(
        f"\nRELIABILITY symlinks: SOURCE with a file and a folder symlink leading out, and "
        f"DEST/studies/<uid> leading out → {len(records)} SymlinkEscape error records, 1 good "
        f"study reported, 2 model calls, exit 0; DEST/errors leading out → exit "
        f"{stopped.returncode}, one line naming the key, 0 files outside"
    )


def test_a_folder_removed_or_unblocked_after_its_check_is_made_again(tmp_path):
    """The once-per-folder check caches folders only: a file in a folder's place fails that
    write and is looked at again; a checked folder removed later is made again."""
    import shutil

    from tasks.storage import LocalStore

    store = LocalStore(tmp_path / "dest")
    (tmp_path / "dest" / "studies").mkdir(parents=True)
    (tmp_path / "dest" / "studies" / UID).write_text("in the way")
    with pytest.raises(NotADirectoryError):
        store.write_bytes(f"studies/{UID}/images/a.png", b"1")
    (tmp_path / "dest" / "studies" / UID).unlink()
    store.write_bytes(f"studies/{UID}/images/a.png", b"2")
    shutil.rmtree(tmp_path / "dest" / "studies")
    store.write_bytes(f"studies/{UID}/images/a.png", b"3")
    assert (tmp_path / "dest" / "studies" / UID / "images" / "a.png").read_bytes() == b"3"
