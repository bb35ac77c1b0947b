"""`radflow bridge --orthanc`: a real Orthanc's change feed → one `radflow.study.ready` event
per stable study on a real Prefect API, across a kill and a restart of the bridge; then the
event's source screens exactly that study and its SR goes back without a second event."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from flows.serve import runner_deployments
from simulator.process import stop
from simulator.samples import synthetic_ct
from tests.helpers import (
    PASSWORD_ENV,
    RADFLOW,
    ROOT,
    USER_ENV,
    child_env,
    dicomweb_client,
    pacs_config,
    prefect_api,
    read_reports,
    sr_instances,
    wait_for,
)


def _events(api: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["radflow.study.ready"]}}, "limit": 50}
    answer = httpx.post(f"{api}/events/filter", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["events"]


def _of(api: str, uid: str) -> list[dict]:
    return [e for e in _events(api) if e["payload"].get("study_instance_uid") == uid]


def _upload(orthanc, tmp: Path, uid: str, seed: int, slices: range) -> None:
    web = dicomweb_client(orthanc)
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


def _runs(api: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "START_TIME_ASC"}
    return prefect_api(api, "POST", "/flow_runs/filter", json=body)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_stable_studies_trigger_one_on_pacs_run_each_across_a_bridge_restart(
    prefect_harness, simulator, orthanc, tmp_path, monkeypatch, capsys
):
    """`radflow serve` (the on-pacs deployment, its event trigger) and `radflow bridge
    --orthanc` as processes on the Prefect API: a study uploaded in two halves, and one that
    arrives while the bridge is killed, each give one event, one run, one report and one SR
    in Orthanc; the SRs make both studies stable again without a second event."""
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    dest = tmp_path / "out"
    config = pacs_config(simulator, tmp_path, publish={"dicomweb": "same"}, output=str(dest))
    state = tmp_path / "state" / "bridge.json"
    env = child_env(prefect_harness) | {"RADFLOW_CONFIG": config}
    bridge_cmd = [*RADFLOW, "bridge", "--orthanc", orthanc.url, "--state", str(state),
                  "--config", config, "--poll-seconds", "0.3"]  # fmt: skip
    serve_cmd = [*RADFLOW, "serve", "--only", "on-pacs", "--poll-seconds", "1"]
    logs: list = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        logs.append(open(tmp_path / f"{name}.log", "ab"))  # noqa: SIM115 (closed at the end)
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT)

    def tail(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    def reported(uid: str) -> bool:
        assert serve.poll() is None, tail("serve")
        return uid in read_reports(dest)

    a, b = "1.2.826.0.1.3680043.10.556.1", "1.2.826.0.1.3680043.10.556.2"
    serve = start(serve_cmd, "serve")
    bridge = None
    try:

        def registered() -> dict | None:
            assert serve.poll() is None, tail("serve")
            automations = prefect_api(prefect_harness, "POST", "/automations/filter", json={})
            if not any("on-pacs" in x["name"] for x in automations):
                return None
            return prefect_api(prefect_harness, "GET", "/deployments/name/screen/on-pacs")

        deployment = wait_for("radflow serve registers on-pacs", registered, 600)
        bridge = start(bridge_cmd, "bridge")
        wait_for("the bridge's state file", state.exists, 60)

        # study A in two halves, 1 s apart (StableAge is 3 s): one event, once all is in
        _upload(orthanc, tmp_path, a, 1, range(0, 3))
        time.sleep(1.0)  # the upload's own timing, not a synchronisation
        _upload(orthanc, tmp_path, a, 1, range(3, 6))
        last_upload = time.time()
        (event,) = wait_for("the event of study A", lambda: _of(prefect_harness, a))
        assert bridge.poll() is None, tail("bridge")
        assert event["payload"]["instances"] == 6
        assert event["resource"]["prefect.resource.id"] == (
            f"dicomweb+{orthanc.url}/dicom-web/studies/{a}"
        )
        source_a = f"dicomweb+{orthanc.url}/dicom-web?StudyInstanceUID={a}"
        assert event["payload"]["source"] == source_a
        wait_for("the report of study A", lambda: reported(a), 600)
        with capsys.disabled():
            print(
                f"\nstudy A: event visible {event['occurred']}, report "
                f"{time.time() - last_upload:.1f} s after its last upload"
            )

        # killed hard (no clean exit); study B arrives and becomes stable while it is down
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        _upload(orthanc, tmp_path, b, 2, range(0, 2))
        b_id = wait_for("Orthanc's id of study B", lambda: _orthanc_id(orthanc, b))
        wait_for("study B stable in Orthanc", lambda: _stable_changes(orthanc, b_id))
        assert _of(prefect_harness, b) == []
        bridge = start(bridge_cmd, "bridge")
        wait_for("the event of study B", lambda: _of(prefect_harness, b))
        wait_for("the report of study B", lambda: reported(b), 600)

        # each SR went back once; it made its study stable again, which is no new event
        a_id = _orthanc_id(orthanc, a)
        for uid, oid in ((a, a_id), (b, b_id)):
            assert len(sr_instances(orthanc, uid)) == 1
            again = wait_for(
                f"{uid} stable after its SR", lambda o=oid: _stable_changes(orthanc, o)[1:]
            )

            def passed(seq: int = again[-1]) -> bool:
                return json.loads(state.read_text())["last"] >= seq

            wait_for("the bridge past that change", passed, 60)
        assert bridge.poll() is None, tail("bridge")
        assert len(_of(prefect_harness, a)) == 1 and len(_of(prefect_harness, b)) == 1

        def finished() -> list[dict]:
            runs = _runs(prefect_harness, deployment["id"])
            done = all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs)
            return runs if done and len(runs) >= 2 else []

        runs = wait_for("the on-pacs runs finish", finished, 300)
        assert sorted(r["parameters"]["source"] for r in runs) == sorted(
            [source_a, f"dicomweb+{orthanc.url}/dicom-web?StudyInstanceUID={b}"]
        )
        assert all(r["state_type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
        reports = read_reports(dest)
        assert set(reports) == {a, b}
        assert {r.published.state for r in reports.values()} == {"stored"}
        for name in ("bridge", "serve"):
            assert orthanc.password not in tail(name)
    finally:
        for proc in (bridge, serve):
            if proc is not None and proc.poll() is None:
                stop(proc)
        for handle in logs:
            handle.close()
