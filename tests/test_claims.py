"""Per-study claims: one run at a time reads a study, whatever runs share a DEST. The store
primitives (conditional create, compare-and-swap, conditional delete) on a folder and on S3
(moto_server), races of threads for one claim, and `radflow screen` run twice at once over the
same SOURCE and DEST (local and S3), and over claims planted by a crashed and a live run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pydicom
import pytest

from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tests.helpers import RADFLOW, child_env, run_screen, sim_calls, sim_config

N = 8  # studies


def _bucket(name: str) -> str:
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/out/"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.e2e)])
def store(request, tmp_path):
    """A DEST store: a folder, or a bucket on moto_server."""
    from tasks.storage import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "dest"))
    request.getfixturevalue("moto_server")
    return open_store(_bucket(f"claims-{uuid.uuid4().hex[:8]}"))


# ---- the store primitives -------------------------------------------------------------------


def test_conditional_create_swap_and_delete(store):
    key = "claims/1.2.3.json"
    assert store.read_versioned(key) is None
    v1 = store.put_if(key, b"one", None)
    assert v1 and store.put_if(key, b"two", None) is None  # exists: no second create
    assert store.read_versioned(key) == (b"one", v1)
    assert store.put_if(key, b"two", "not-the-version") is None
    v2 = store.put_if(key, b"two", v1)
    assert v2 and v2 != v1 and store.read_bytes(key) == b"two"
    assert store.put_if(key, b"three", v1) is None  # v1 is gone: a stale writer loses
    assert not store.delete_if(key, v1)
    assert store.delete_if(key, v2) and store.read_versioned(key) is None
    assert not store.delete_if(key, v2)
    assert store.put_if(key, b"again", None)  # free again


def _lease(run_id: str, expires_in: float, host: str = "elsewhere/pid:[1]", pid: int = 4242):
    now = datetime.now(UTC)
    return json.dumps(
        {
            "run_id": run_id,
            "token": uuid.uuid4().hex,
            "host": host,
            "pid": pid,
            "acquired_at": (now - timedelta(hours=1)).isoformat(),
            "expires_at": (now + timedelta(seconds=expires_in)).isoformat(),
        }
    ).encode()


def test_a_claim_is_held_renewed_released_and_stale_ones_are_taken_over(store):
    from tasks.screening.claims import Claim, Lease, claim_key, take

    uid = "1.2.3.4"
    mine = take(store, uid, "run-a", 60)
    assert isinstance(mine, Claim)
    other = take(store, uid, "run-b", 60)  # held: run-b is told who holds it, until when
    assert isinstance(other, Lease) and other.run_id == "run-a"
    assert other.describe().startswith("claimed by run run-a (expires at 20")
    before = mine.lease.expires_at
    assert mine.renew() and mine.lease.expires_at >= before
    mine.release()
    assert store.read_versioned(claim_key(uid)) is None
    assert isinstance(take(store, uid, "run-b", 60), Claim)

    cases = {
        "expired": (_lease("crashed-run", -60), Claim),
        "unreadable": (b"{not json", Claim),
        "naive date": (_lease("odd", 3600).replace(b"+00:00", b""), Claim),
        "live elsewhere": (_lease("other-run", 3600), Lease),
    }
    for i, (what, (planted, expected)) in enumerate(cases.items()):
        store.put_if(claim_key(f"9.{i}"), planted, None)
        got = take(store, f"9.{i}", "run-c", 60)
        assert isinstance(got, expected), what
    # a process of this host that is gone holds nothing, at once; a running one holds
    from tasks.screening.claims import _HOST

    dead = next(pid for pid in range(2**22, 1, -1) if not Path(f"/proc/{pid}").exists())
    store.put_if(claim_key("8.1"), _lease("killed", 3600, _HOST, dead), None)
    assert isinstance(take(store, "8.1", "run-c", 60), Claim)
    store.put_if(claim_key("8.2"), _lease("alive", 3600, _HOST, os.getppid()), None)
    assert isinstance(take(store, "8.2", "run-c", 60), Lease)


def test_a_taken_over_claim_is_lost_by_its_old_holder(store):
    from tasks.screening.claims import Claim, claim_key, take

    old = take(store, "5.5", "slow-run", 60)
    assert isinstance(old, Claim)
    # the slow run's lease runs out (planted: its expiry moved into the past)
    expired = old.lease.model_copy(update={"expires_at": datetime.now(UTC) - timedelta(1)})
    old.version = store.put_if(claim_key("5.5"), expired.model_dump_json().encode(), old.version)
    new = take(store, "5.5", "fast-run", 60)
    assert isinstance(new, Claim)
    assert not old.renew() and not old.held()
    assert old.lost.startswith("claimed by run fast-run")
    old.release()  # deletes nothing that is not its own
    assert store.read_versioned(claim_key("5.5"))[1] == new.version


@pytest.mark.parametrize("stale", [False, True], ids=["free", "expired"])
def test_racing_threads_get_one_claim(store, stale):
    """8 threads at a barrier claim one study, 20 times: a free one (conditional create), or
    one held by a crashed run (conditional takeover of the expired lease): one winner each."""
    from tasks.screening.claims import Claim, claim_key, take

    for round_ in range(20):
        uid = f"7.{round_}"
        if stale:
            store.put_if(claim_key(uid), _lease("crashed", -1), None)
        barrier = threading.Barrier(8)
        got: list = []

        def one(i: int, uid: str = uid, barrier=barrier, got=got) -> None:
            barrier.wait()
            got.append(take(store, uid, f"run-{i}", 60))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [g for g in got if isinstance(g, Claim)]
        assert len(got) == 8 and len(won) == 1, (round_, got)
        held = json.loads(store.read_bytes(claim_key(uid)))
        assert held["token"] == won[0].lease.token  # the winner's lease is the one stored
    kind = "s3" if store.uri.startswith("s3://") else "local"
    print(f"\nRELIABILITY claim races ({kind}, {'expired' if stale else 'free'}"
          f"): 20 rounds × 8 threads → 20 winners, 1 per round")  # fmt: skip


# ---- two runs at once -----------------------------------------------------------------------


def _upload(folder: Path, uri: str) -> None:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def _places(kind: str, tmp_path: Path) -> tuple[str, str]:
    """SOURCE and DEST URIs with N synthetic studies in SOURCE."""
    folder = tmp_path / "in"
    build_sample_folder(folder, synthetic=N, real=False, junk=False)
    if kind == "local":
        return str(folder), str(tmp_path / "out")
    tag = uuid.uuid4().hex[:8]
    source = _bucket(f"src-{tag}")
    _upload(folder, source)
    return source, _bucket(f"dst-{tag}")


def _files(dest: str) -> dict[str, bytes]:
    from tasks.storage import open_store

    store = open_store(dest)
    return {ref.key: store.read_bytes(ref.key) for ref in store.list()}


def _runs_per_study(files: dict[str, bytes]) -> dict[str, str]:
    """Study → the run that wrote it; fails unless report.json, .md, .sr.dcm and .fhir.json
    of each study come from that one run (the SR UID and the FHIR id derive from the
    report's creation time; report.md names the run)."""
    from tasks.core.schema import Report
    from tasks.reports.sr import sr_uids

    runs = {}
    for key in (k for k in files if k.endswith("/report.json")):
        folder = key.removesuffix("report.json")
        report = Report.model_validate_json(files[key])
        md = files[folder + "report.md"].decode()
        sr = pydicom.dcmread(io.BytesIO(files[folder + "report.sr.dcm"]))
        fhir = json.loads(files[folder + "report.fhir.json"])
        assert report.run_id and f"run {report.run_id} " in md, (key, report.run_id)
        assert sr.SOPInstanceUID == sr_uids(report)[1], key
        assert datetime.fromisoformat(fhir["issued"]) == report.created_at, key
        runs[report.study_instance_uid] = report.run_id
    return runs


def _screen(source: str, dest: str, config: Path, api: str, log: Path) -> subprocess.Popen:
    cmd = [*RADFLOW, "screen", source, "--out", dest, "--config", str(config)]
    out = open(log, "wb")  # noqa: SIM115 (closed with the process, below)
    return subprocess.Popen(cmd, env=child_env(api), stdout=out, stderr=subprocess.STDOUT)


def _summaries(files: dict[str, bytes]) -> list[dict]:
    return [json.loads(v) for k, v in files.items() if k.startswith("runs/") and k.endswith("json")]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_runs_at_once_read_each_study_once(prefect_harness, tmp_path, kind, request):
    if kind == "s3":
        request.getfixturevalue("moto_server")
    source, dest = _places(kind, tmp_path)
    with running_simulator("--seed", "11", "--latency", "0.6") as sim:
        config = sim_config(sim, tmp_path, max_studies_in_flight=1)  # claim by claim
        before = sim_calls(sim)
        runs = [_screen(source, dest, config, prefect_harness, tmp_path / f"run{i}.log")
                for i in range(2)]  # fmt: skip
        for i, run in enumerate(runs):
            assert run.wait(timeout=600) == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
        calls = sim_calls(sim) - before
    files = _files(dest)
    summaries = _summaries(files)
    assert len(summaries) == 2 and not [k for k in files if k.startswith("errors/")]
    assert calls == N * 2  # each study read once, by one model each
    assert sum(s["reported"] for s in summaries) == N  # every study reported once …
    by_run = _runs_per_study(files)  # … its four files by one run
    assert len(by_run) == N
    for s in summaries:
        assert s["reported"] + s["skipped"] + s.get("claimed_elsewhere", 0) == N, s
        assert s["errors"] == 0
    assert set(by_run.values()) <= {s["run_id"] for s in summaries}
    assert sum(s.get("claimed_elsewhere", 0) for s in summaries) > 0  # they did overlap
    assert not [k for k in files if k.startswith("claims/")]  # every claim released
    shares = sorted(list(by_run.values()).count(s["run_id"]) for s in summaries)
    print(
        f"\nRELIABILITY two runs at once ({kind} DEST): {N} studies → {calls} model calls "
        f"({N} × 2 models), reported {shares[0]} + {shares[1]}, "
        f"{sum(s.get('claimed_elsewhere', 0) for s in summaries)} left to the other run, "
        f"{sum(s['skipped'] for s in summaries)} skipped as reported; every study's 4 files "
        f"from one run, 0 claims left"
    )


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_claims_of_a_crashed_run_are_taken_over_and_a_live_runs_are_left(
    prefect_harness, simulator, tmp_path, kind, request
):
    from tasks.ingest.discover import discover_studies
    from tasks.storage import open_store

    if kind == "s3":
        request.getfixturevalue("moto_server")
    source, dest = _places(kind, tmp_path)
    uids = [s.study_instance_uid for s in discover_studies(open_store(source)).studies]
    out = open_store(dest)
    live = _lease("other-run", 3600)
    planted = {uids[0]: _lease("crashed-run", -30), uids[1]: b"\x00garbage", uids[2]: live}
    for uid, data in planted.items():
        out.write_bytes(f"claims/{uid}.json", data)
    config = sim_config(simulator, tmp_path)
    before = sim_calls(simulator)
    first = run_screen(source, dest, config, api_url=prefect_harness)
    assert first.returncode == 0, first.stderr[-3000:]
    files = _files(dest)
    (summary,) = _summaries(files)
    assert summary["reported"] == N - 1 and summary.get("claimed_elsewhere") == 1
    assert summary["errors"] == 0 and not [k for k in files if k.startswith("errors/")]
    assert sim_calls(simulator) - before == 2 * (N - 1)
    reported = _runs_per_study(files)
    assert sorted(reported) == sorted(set(uids) - {uids[2]})  # the stale two taken over
    assert [k for k in files if k.startswith("claims/")] == [f"claims/{uids[2]}.json"]
    assert files[f"claims/{uids[2]}.json"] == live  # the live run's claim untouched
    expires = json.loads(live)["expires_at"][:19]
    assert f"claimed by run other-run (expires at {expires}Z)" in first.stdout + first.stderr
    assert "1 claimed by other runs" in first.stdout

    # the live run dies and its lease runs out: the next run reads the study it held
    out.write_bytes(f"claims/{uids[2]}.json", _lease("other-run", -1))
    second = run_screen(source, dest, config, api_url=prefect_harness)
    assert second.returncode == 0, second.stderr[-3000:]
    files = _files(dest)
    assert len(_runs_per_study(files)) == N and not [k for k in files if "claims/" in k]
    last = max(_summaries(files), key=lambda s: s["started_at"])
    assert (last["reported"], last["skipped"], last.get("claimed_elsewhere")) == (1, N - 1, 0)
    assert sim_calls(simulator) - before == 2 * N
    print(
        f"\nRELIABILITY planted claims ({kind} DEST): 1 expired + 1 unreadable taken over, "
        f"1 live left (claimed_elsewhere 1, no error record, its claim untouched); after its "
        f"expiry the next run reported it: {N}/{N} reported once, {2 * N} model calls"
    )


def test_the_lease_has_bounds():
    from tasks.core.config import Settings

    assert Settings().claim_lease_seconds == 300
    for bad in (1, 10**6):
        with pytest.raises(ValueError, match="claim_lease_seconds"):
            Settings(claim_lease_seconds=bad)
