"""`radflow bridge --orthanc`: a real Orthanc's change feed → one `radflow.study.ready` event
per stable study on a real Prefect API, across a kill and a restart of the bridge; then the
event's source screens exactly that study and its SR goes back without a second event."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from flows.screen import screen
from flows.serve import runner_deployments
from simulator.process import stop
from simulator.samples import synthetic_ct
from tests.conftest import child_env, read_reports
from tests.test_pacs import PASSWORD_ENV, USER_ENV, _client, _config, _sr_instances

ROOT = Path(__file__).resolve().parent.parent


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    """Poll external state (Orthanc, the Prefect API, a file) until ``check`` is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.3)
    return value


def _events(api: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["radflow.study.ready"]}}, "limit": 50}
    answer = httpx.post(f"{api}/events/filter", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["events"]


def _of(api: str, uid: str) -> list[dict]:
    return [e for e in _events(api) if e["payload"].get("study_instance_uid") == uid]


def _upload(orthanc, tmp: Path, uid: str, seed: int, slices: range) -> None:
    web = _client(orthanc)
    for i in slices:
        path = synthetic_ct(
            tmp / f"{seed}-{i}.dcm",
            lesion=False,
            seed=seed * 100 + i,
            study_uid=uid,
            series_uid=f"{uid}.1",
            instance=i + 1,
            phi={"PatientID": f"SYN-{seed}", "PatientName": f"SYNTHETIC^{seed}"},
        )
        web.store_instances([pydicom.dcmread(path)])


def _stable_changes(orthanc, orthanc_id: str) -> list[int]:
    feed = httpx.get(
        f"{orthanc.url}/changes",
        params={"since": 0, "limit": 10000},
        auth=(orthanc.user, orthanc.password),
        timeout=30,
    ).json()
    return [
        c["Seq"]
        for c in feed["Changes"]
        if c["ChangeType"] == "StableStudy" and c["ID"] == orthanc_id
    ]


def _orthanc_id(orthanc, uid: str) -> str | None:
    found = httpx.post(
        f"{orthanc.url}/tools/lookup",
        content=uid,
        auth=(orthanc.user, orthanc.password),
        timeout=30,
    ).json()
    studies = [f["ID"] for f in found if f["Type"] == "Study"]
    return studies[0] if studies else None


def test_the_on_pacs_deployment_screens_the_event_source():
    (deployment,) = runner_deployments(only=["on-pacs"])
    (trigger,) = deployment.triggers
    assert trigger.expect == {"radflow.study.ready"}
    assert trigger.match.root == {"prefect.resource.id": "dicomweb+*"}
    assert trigger.parameters == {"source": "{{ event.payload.source }}"}


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_stable_studies_trigger_once_across_a_kill_and_restart(
    prefect_harness, simulator, orthanc, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    config = _config(simulator, tmp_path, publish={"dicomweb": "same"})
    state = tmp_path / "state" / "bridge.json"
    env = child_env(prefect_harness)
    cmd = [sys.executable, "-m", "flows.cli", "bridge", "--orthanc", orthanc.url,
           "--state", str(state), "--config", config, "--poll-seconds", "0.3"]  # fmt: skip
    log = tmp_path / "bridge.log"
    logs = []

    def start() -> subprocess.Popen:
        logs.append(open(log, "ab"))  # noqa: SIM115 (closed at the end of the test)
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT)

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:]

    a, b = "1.2.826.0.1.3680043.10.556.1", "1.2.826.0.1.3680043.10.556.2"
    bridge = start()
    try:
        wait_for("the bridge's state file", state.exists, 60)
        # study A in two halves, 1 s apart (StableAge is 3 s): one event, once all is in
        _upload(orthanc, tmp_path, a, 1, range(0, 3))
        time.sleep(1.0)  # the upload's own timing, not a synchronisation
        _upload(orthanc, tmp_path, a, 1, range(3, 6))
        last_upload = time.time()
        (event,) = wait_for("the event of study A", lambda: _of(prefect_harness, a))
        assert bridge.poll() is None, tail()
        assert event["payload"]["instances"] == 6
        assert event["resource"]["prefect.resource.id"] == (
            f"dicomweb+{orthanc.url}/dicom-web/studies/{a}"
        )
        assert (
            event["payload"]["source"] == f"dicomweb+{orthanc.url}/dicom-web?StudyInstanceUID={a}"
        )
        with capsys.disabled():
            print(f"\nstudy A announced {time.time() - last_upload:.1f} s after its last upload")

        # killed hard (no clean exit); study B arrives and becomes stable while it is down
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        _upload(orthanc, tmp_path, b, 2, range(0, 2))
        b_id = wait_for("Orthanc's id of study B", lambda: _orthanc_id(orthanc, b))
        wait_for("study B stable in Orthanc", lambda: _stable_changes(orthanc, b_id))
        assert _of(prefect_harness, b) == []
        bridge = start()
        (event_b,) = wait_for("the event of study B", lambda: _of(prefect_harness, b))
        assert len(_of(prefect_harness, a)) == 1  # not repeated after the restart

        # the event's source, as the on-pacs deployment passes it: exactly study B, its SR
        # published back; that makes B stable again in Orthanc, with no second event
        dest = tmp_path / "out"
        summary = asyncio.run(screen(event_b["payload"]["source"], str(dest), config))
        assert set(read_reports(dest)) == {b} and summary.published == 1
        assert len(_sr_instances(orthanc, b)) == 1
        seqs = wait_for("B stable again after the SR", lambda: _stable_changes(orthanc, b_id)[1:])

        def passed() -> bool:
            return json.loads(state.read_text())["last"] >= seqs[0]

        wait_for("the bridge past B's second StableStudy", passed, 60)
        assert bridge.poll() is None, tail()
        assert len(_of(prefect_harness, b)) == 1 and len(_of(prefect_harness, a)) == 1
        assert orthanc.password not in log.read_text()
    finally:
        if bridge.poll() is None:
            stop(bridge)
        for handle in logs:
            handle.close()
