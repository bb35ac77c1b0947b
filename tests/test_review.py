"""The radiologist's review (issue 20): the typed form and the checks the Prefect server makes
with its schema, review.json, the page with the key images, the listing and the exports as
evaluation labels and fine-tune annotations; end to end on a real `prefect server start`:
screening flags studies, their review runs wait suspended, the form submitted through the API
(as the UI does) resumes each, the verdicts feed `radflow evaluate`, measured weights feed the
next screening, and an unanswered review expires and is asked again."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from prefect._internal.pydantic.v2_schema import create_v2_schema
from prefect.utilities.schema_tools import ValidationError as SchemaError
from prefect.utilities.schema_tools import validate as server_validate
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from simulator.process import panel_config, running_simulator
from simulator.samples import synthetic_ct
from tasks.core.config import ReviewConfig, Settings
from tasks.core.errors import LabelError, ReviewError
from tasks.core.privacy import LogNames, find_studies, load_key
from tasks.core.schema import Consensus, ImageInfo, Report, ReviewState, Urgency
from tasks.evaluation.metrics import parse_labels
from tasks.evaluation.outputs import load_labels
from tasks.finetune.examples import parse_annotation
from tasks.reports.markdown import image_name
from tasks.reports.write import report_key, review_key
from tasks.review.export import annotations_jsonl, labels_csv, review_rows
from tasks.review.page import page_images, render_page
from tasks.review.verdicts import (
    ReviewForm,
    read_verdict,
    resolve,
    review_names,
    review_run_name,
    set_review_state,
    verdict_from_form,
    write_index,
    write_verdict,
)
from tasks.storage import LocalStore, Store, open_store
from tests.browser import chromium, open_browser
from tests.helpers import (
    KEY_ENV,
    RADFLOW,
    SERVER_SETTINGS,
    TEST_KEY,
    make_report,
    panel_readings,
    prefect_api,
    prefect_server_process,
    process,
    read_reports,
    run_radflow,
    run_screen,
    tail,
    wait_for,
)

UID = "1.2.826.0.1.3680043.10.999.424242"


def _png(size: int = 600) -> bytes:
    arr = (np.arange(size * size).reshape(size, size) % 251).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _report(uid: str = UID, abnormal: bool | None = True, source: str = "/src/a.dcm") -> Report:
    png = _png()
    sha = hashlib.sha256(png).hexdigest()
    urgency = None if abnormal is None else Urgency.FOLLOW_UP if abnormal else Urgency.NORMAL
    gpt, claude = panel_readings()  # the report tests' panel: a failed model, hostile text
    readings = [
        gpt.model_copy(
            update={"findings": ["nodule | <script>alert(1)</script>"], "rationale": "a\nb"}
        ),
        claude.model_copy(update={"ok": False, "abnormal": None, "urgency": None, "error": "boom"}),
    ]
    consensus = Consensus(
        abnormal=abnormal,
        urgency=urgency,
        score=0.5,
        agreement=0.5,
        needs_review=True,
        review_reasons=["models disagree on abnormal"],
    )
    return make_report(
        uid,
        readings,
        consensus,
        status="degraded",
        images=[
            ImageInfo(
                sop_instance_uid="1.2.3.4",
                series_instance_uid="1.2.3",
                source=source,
                sha256=sha,
                width=600,
                height=600,
                window="lung",
                modality="CT",
            )
        ],
        context={"modality": "CT", "age_band": "60-69"},
    )


def _dest(where: Path | Store, *reports: Report, flagged: bool = True) -> Store:
    """A DEST as screening leaves it: report.json, key image, review pointer, FHIR subject
    (``where``: a tmp folder, its DEST is ``dest/``; or a store)."""
    store = LocalStore(where / "dest") if isinstance(where, Path) else where
    for report in reports:
        uid = report.study_instance_uid
        store.write_bytes(report_key(uid, image_name(report.images[0].sha256)), _png())
        store.write_bytes(report_key(uid), report.model_dump_json().encode())
        pointer = {"needs_review": flagged, "study_instance_uid": uid}
        store.write_bytes(review_key(uid), json.dumps(pointer).encode())
        fhir = {"subject": {"identifier": {"value": f"P-{uid.rpartition('.')[2]}"}}}
        store.write_bytes(report_key(uid, "report.fhir.json"), json.dumps(fhir).encode())
    return store


def _form(**values) -> ReviewForm:
    return ReviewForm(**({"abnormal": "yes", "urgency": "follow_up", "reviewer": "KJH"} | values))


def test_the_form_schema_refuses_what_the_server_must_refuse():
    """The schema Prefect stores for the form (the same function) checked by the validator the
    server runs on POST /flow_runs/{id}/resume: a contradictory or incomplete form never
    resumes the run."""
    schema = create_v2_schema("ReviewForm", model_base=ReviewForm)
    good = [
        {"abnormal": "yes", "urgency": "immediate", "reviewer": "KJH", "findings": "mass"},
        {"abnormal": "no", "urgency": "normal", "reviewer": "김재훈"},
        {"abnormal": "no", "urgency": "immediate", "reviewer": "ab", "not_assessable": True},
    ]
    for value in good:
        server_validate(value, schema, raise_on_error=True)
        ReviewForm(**value)
    bad = {
        "normal but urgent": {"abnormal": "no", "urgency": "immediate", "reviewer": "KJH"},
        "abnormal but normal": {"abnormal": "yes", "urgency": "normal", "reviewer": "KJH"},
        "digits as initials": {"abnormal": "no", "urgency": "normal", "reviewer": "K1"},
        "no reviewer": {"abnormal": "no", "urgency": "normal"},
        "unknown urgency": {"abnormal": "yes", "urgency": "soon", "reviewer": "KJH"},
        "extra field": {"abnormal": "no", "urgency": "normal", "reviewer": "KJH", "x": 1},
    }
    for value in bad.values():  # the keys say why each is refused
        with pytest.raises(SchemaError):
            server_validate(value, schema, raise_on_error=True)
        with pytest.raises(ValidationError):
            ReviewForm(**value)
    # every field the radiologist fills in is in the form, with its title
    titles = {k: v.get("title") for k, v in schema["properties"].items()}
    assert set(titles) == {"abnormal", "urgency", "findings", "reviewer", "not_assessable"}
    assert (
        titles["reviewer"] == "Reviewer initials" and titles["not_assessable"] == "Not assessable"
    )


def test_a_verdict_records_who_when_what_and_the_report_version(tmp_path):
    report = _report()
    store = _dest(tmp_path, report)
    when = datetime(2026, 12, 3, 9, 30, tzinfo=UTC)
    verdict = verdict_from_form(
        _form(abnormal="no", urgency="normal", findings="clear lungs;\n no effusion "),
        report,
        flow_run_id="run-1",
        attempt=2,
        reviewed_at=when,
    )
    key = write_verdict(store, verdict)
    assert key == f"studies/{UID}/review.json"
    back = read_verdict(store, UID)
    assert back == verdict
    assert (back.abnormal, back.urgency, back.reviewer, back.reviewed_at) == (
        False,
        Urgency.NORMAL,
        "KJH",
        when,
    )
    assert back.findings == ["clear lungs", "no effusion"]
    assert back.report.created_at == report.created_at  # the version reviewed
    assert back.report.abnormal is True and back.agrees_with_consensus is False
    assert back.attempt == 2 and back.flow_run_id == "run-1"
    unsure = verdict_from_form(_form(not_assessable=True), report)
    assert unsure.abnormal is None and unsure.urgency is None
    assert unsure.agrees_with_consensus is None
    # the report's review state: schema-checked and written back
    state = ReviewState(status="done", verdict=key, reviewer="KJH")
    set_review_state(store, report, state)
    assert Report.model_validate_json(store.read_bytes(report_key(UID))).review == state


def test_review_runs_are_named_by_a_keyed_id_never_the_uid(tmp_path):
    """The id is the study's log id under DEST's privacy key (tasks.core.privacy), as the screening
    logs name it with privacy.log_uids: hash; `radflow lookup` maps it back; the review runs'
    index maps it back for the flow, so its parameters carry no UID either."""
    report = _report()
    store = _dest(tmp_path, report)
    study = review_names(store).study(UID)
    assert study == LogNames(load_key(store)).study(UID) and len(study) == 16
    assert study != hashlib.sha256(UID.encode()).hexdigest()[:16]  # keyed, not a plain hash
    name = review_run_name(report, study)
    assert name == f"review-ct-follow-up-{study}"
    assert review_run_name(report, study, 3).endswith("-3")
    assert UID not in name and "424242" not in name
    write_index(store, study, UID)
    assert resolve(store, study) == UID
    with pytest.raises(ReviewError, match='review id "0123456789abcdef" is not known'):
        resolve(store, "0123456789abcdef")
    with pytest.raises(ReviewError, match="is not known"):
        resolve(store, "../../etc/passwd")
    studies = LocalStore(tmp_path / "dest" / "studies")  # what `radflow lookup DEST ID` reads
    assert find_studies(studies, LogNames(load_key(store)), [study]) == {study: UID}


def test_the_page_inlines_the_key_images_and_escapes_model_text(tmp_path):
    report = _report()
    store = _dest(tmp_path, report)
    images = page_images(store, report, edge=256)
    assert [max(Image.open(io.BytesIO(i.png)).size) for i in images] == [256]
    state = ReviewState(status="pending", expires_at=datetime(2026, 12, 10, tzinfo=UTC))
    page = render_page(report, images, "0123456789abcdef", "s3://reports/out", state)
    assert UID not in page  # privacy.log_uids: hash, the default: Prefect shows no UID
    assert "`radflow lookup s3://reports/out 0123456789abcdef`" in page
    plain = render_page(report, images, "0123456789abcdef", "out", state, show_uid=True)
    assert f"`{UID}`" in plain
    assert page.count("](data:image/png;base64,") == 1
    assert "<script>" not in page and "&lt;script&gt;" in page  # model text shown, not run
    assert "nodule \\| " in page  # a '|' in a finding does not break the table
    assert (
        "| result | **abnormal** (score 0.50, agreement 50%) | **abnormal** | failed: boom" in page
    )
    assert "expires at 2026-12-10 00:00 UTC" in page
    missing = page_images(LocalStore(tmp_path / "empty"), report, edge=256)
    assert "the file is missing under DEST" in render_page(
        report, missing, "x", "d", ReviewState(status="pending")
    )


def test_listing_and_exports_from_dest_alone(tmp_path):
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    reports = {n: _report(f"{UID}.{n}", source=f"{tmp_path}/src/{n}.dcm") for n in range(6)}
    store = _dest(tmp_path, *reports.values())
    states = {
        1: ReviewState(status="pending", expires_at=now + timedelta(hours=1)),
        2: ReviewState(status="pending", expires_at=now - timedelta(hours=1)),
        3: ReviewState(status="requested"),
    }
    for n, state in states.items():
        set_review_state(store, reports[n], state)
    for n, form in {4: _form(), 5: _form(abnormal="no", urgency="normal", findings="a; b")}.items():
        write_verdict(store, verdict_from_form(form, reports[n]))
    unsure = _report(f"{UID}.7")
    _dest(tmp_path, unsure)
    write_verdict(store, verdict_from_form(_form(not_assessable=True), unsure))
    cleared = _report(f"{UID}.8")
    _dest(tmp_path, cleared, flagged=False)

    rows = {r.uid: r for r in review_rows(str(tmp_path / "dest"), now=now)}
    status = {uid.rpartition(".")[2]: r.status for uid, r in rows.items()}
    assert status == {
        "0": "not_requested",
        "1": "pending",
        "2": "expired",
        "3": "requested",
        "4": "done",
        "5": "done",
        "7": "done",
        "8": "cleared",
    }
    labels = parse_labels(labels_csv(list(rows.values())), "export")  # the evaluation's parser
    assert {(x.study_instance_uid, x.abnormal, x.patient_id) for x in labels} == {
        (f"{UID}.4", 1, "P-4"),
        (f"{UID}.5", 0, "P-5"),
    }  # not assessable: no label
    assert {x.findings for x in labels} == {(), ("a", "b")}

    text, skipped = annotations_jsonl(list(rows.values()), str(tmp_path / "src"))
    annotations = [
        parse_annotation(json.loads(line), n) for n, line in enumerate(text.splitlines())
    ]
    assert sorted(a.images for a in annotations) == [("4.dcm",), ("5.dcm",)]
    assert sorted(a.reading.abnormal for a in annotations) == [False, True]
    assert skipped == []
    _, skipped = annotations_jsonl(list(rows.values()), str(tmp_path / "elsewhere"))
    assert len(skipped) == 2 and "not under" in skipped[0]


def test_reviews_dest_is_a_label_source_for_evaluate(tmp_path):
    report = _report()
    store = _dest(tmp_path, report)
    uri = f"reviews:{tmp_path / 'dest'}"
    with pytest.raises(LabelError, match="no usable review verdict"):
        load_labels.fn(uri)
    write_verdict(store, verdict_from_form(_form(), report))
    (label,) = load_labels.fn(uri)
    assert (label.study_instance_uid, label.abnormal) == (UID, 1)


def test_review_config_defaults_and_bounds():
    review = Settings().review
    assert review.requests is False and review.deployment == "review/flagged"
    assert (review.timeout_hours, review.on_timeout) == (168.0, "reopen")
    # the report's provenance keeps listing the flagging rules only
    assert set(review.model_dump()) == {
        "min_agreement",
        "on_disagreement",
        "on_immediate",
        "on_degraded",
    }
    for bad in ({"timeout_hours": -1}, {"deployment": "no-slash"}, {"on_timeout": "never"}):
        with pytest.raises(ValidationError):
            ReviewConfig(**bad)


def test_cli_lists_and_exports(tmp_path):
    reports = [_report(f"{UID}.{n}", source=f"{tmp_path}/src/{n}.dcm") for n in range(2)]
    store = _dest(tmp_path, *reports)
    write_verdict(store, verdict_from_form(_form(), reports[0]))
    dest = str(tmp_path / "dest")
    runner = CliRunner()
    listed = runner.invoke(app, ["reviews", "list", dest])
    assert listed.exit_code == 0, listed.output
    assert f"{UID}.0" in listed.output and "2 flagged studies" in listed.output
    assert "1 done" in listed.output and "1 not_requested" in listed.output
    only = runner.invoke(app, ["reviews", "list", dest, "--status", "done"])
    assert f"{UID}.1" not in only.output
    assert runner.invoke(app, ["reviews", "list", dest, "--status", "odd"]).exit_code == 2
    out, ann = tmp_path / "labels.csv", tmp_path / "ann.jsonl"
    args = ["reviews", "export", dest, "--out", str(out), "--annotations", str(ann)]
    assert runner.invoke(app, args).exit_code == 2  # --annotations needs --images
    done = runner.invoke(app, [*args, "--images", str(tmp_path / "src")])
    assert done.exit_code == 0, done.output
    assert "1 labels (1 abnormal, 0 normal" in done.output
    assert list(csv.DictReader(out.open()))[0]["study_instance_uid"] == f"{UID}.0"
    assert json.loads(ann.read_text())["image"] == ["0.dcm"]


@pytest.mark.e2e
def test_listing_and_labels_from_a_dest_on_s3(moto_server):
    """The same listing and `reviews:DEST` labels with DEST on S3 (moto_server)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="rv-reports")
    dest = "s3://rv-reports/screening/out"
    reports = [_report(f"{UID}.{n}") for n in range(3)]
    store = _dest(open_store(dest), *reports)
    write_verdict(store, verdict_from_form(_form(), reports[0]))
    write_verdict(store, verdict_from_form(_form(not_assessable=True), reports[1]))
    rows = {r.uid: r.status for r in review_rows(dest)}
    assert rows == {f"{UID}.0": "done", f"{UID}.1": "done", f"{UID}.2": "not_requested"}
    (label,) = load_labels.fn(f"reviews:{dest}")
    assert (label.study_instance_uid, label.abnormal, label.patient_id) == (f"{UID}.0", 1, "P-0")
    assert review_rows("s3://rv-reports/elsewhere") == []  # no review pointers: nothing flagged


@pytest.mark.e2e
def test_without_the_review_deployment_each_study_says_why_once(prefect_harness, tmp_path, caplog):
    """review.requests on an API without the review deployment: one warning for the run, the
    reason on each flagged report, and no failure (the run's reports are all written)."""
    import asyncio
    import logging

    from tasks.review.requests import request_reviews

    reports = [_report(f"{UID}.{n}") for n in range(3)]
    store = _dest(tmp_path, *reports)
    review = ReviewConfig(requests=True, deployment="review/absent")
    with caplog.at_level(logging.WARNING, logger="tasks.review.requests"):
        done = asyncio.run(
            request_reviews(store, str(tmp_path / "dest"), [r.study_instance_uid for r in reports],
                            review, config=None, requested_by="run-1")
        )  # fmt: skip
    assert (done.requested, done.not_requested) == (0, 3)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 'deployment "review/absent" not found' in warning and "3 flagged studies" in warning
    rows = review_rows(str(tmp_path / "dest"))
    assert {r.status for r in rows} == {"not_requested"}
    assert all("review/absent" in r.report.review.reason for r in rows)


# --- end to end: screening → review runs → verdicts → evaluation → weights → screening ---

# expired pauses must fail (the review timeout), and promptly
E2E_SERVER = SERVER_SETTINGS | {
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS": "1",
}
ANSWERS = [
    {"abnormal": "yes", "urgency": "follow_up", "findings": "nodule; effusion", "reviewer": "KJH"},
    {"abnormal": "no", "urgency": "normal", "findings": "", "reviewer": "SYL"},
    {"abnormal": "no", "urgency": "normal", "reviewer": "KJH", "not_assessable": True},
]


def _review_runs(env: dict[str, str], deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return prefect_api(env, "POST", "/flow_runs/filter", json=body)


def _artifacts(env: dict[str, str], run_id: str) -> dict[str, str]:
    body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    return {a["key"]: a["data"] for a in prefect_api(env, "POST", "/artifacts/filter", json=body)}


def _timeline(env: dict[str, str], run: dict) -> str:
    """Seconds from the run's creation to its page waiting (Suspended), and from the form's
    submission (Resuming) to the stored verdict (Completed), from the server's state history."""
    states = prefect_api(env, "GET", "/flow_run_states/", params={"flow_run_id": run["id"]})
    at = {s["name"]: datetime.fromisoformat(s["timestamp"]) for s in states}
    created = datetime.fromisoformat(run["created"])
    waited = (at["Suspended"] - created).total_seconds()
    stored = (at["Completed"] - at["Resuming"]).total_seconds()
    return f"{run['name'][-12:]}: suspended +{waited:.1f} s, verdict stored {stored:.1f} s after submit"


def _screenshots(env: dict[str, str], run: dict, page_id: str, tmp_path: Path) -> str:
    """In the Prefect UI (headless Chromium), as a radiologist sees them: the review page
    artifact (its key images decoded, the readings table) and the run's page with its form
    open (menu → Resume). Returns the form's text; saves review-page.png, review-form.png."""
    ui = env["PREFECT_API_URL"].removesuffix("/api")

    def loaded(root: str, text: str) -> str:  # JS: every image decoded, and the text shown
        return (
            f"(() => {{ const root = {root}; if (!root) return false;"
            " const imgs = [...root.querySelectorAll('img[src^=\"data:image/\"]')];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) &&"
            f" root.innerText.includes({json.dumps(text)}); }})()"
        )

    with open_browser(tmp_path / "chromium", 1400, 1600) as page:
        page.goto(f"{ui}/v2/artifacts/artifact/{page_id}")
        page.wait_for("the review page", loaded("document.body", "Readings side by side"), 120)
        painted = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        page.evaluate(painted)
        page.screenshot(tmp_path / "review-page.png")
        page.goto(f"{ui}/v2/runs/flow-run/{run['id']}?tab=Artifacts")
        page.wait_for("the run page", f"!!document.body && document.body.innerText.includes("
                      f"{json.dumps(run['name'])})", 120)  # fmt: skip
        page.click("the run's menu", "[...document.querySelectorAll('button')]"
                   ".find(b => b.innerText.trim() === 'Open menu')")  # fmt: skip
        page.click("Resume", "[...document.querySelectorAll('[role=menuitem]')]"
                   ".find(e => e.innerText.trim() === 'Resume')")  # fmt: skip
        dialog = "document.querySelector('[role=dialog]')"
        page.wait_for("the form", loaded(dialog, "Reviewer initials"), 60)
        page.evaluate(painted)
        page.screenshot(tmp_path / "review-form.png")
        return page.evaluate(f"{dialog}.innerText")


@pytest.mark.e2e
@pytest.mark.timeout(2400)  # a few minutes on an idle machine, more on a loaded one
def test_screening_review_evaluation_loop(tmp_path, capsys):
    start = time.monotonic()

    def phase(name: str) -> None:
        with capsys.disabled():
            print(f"\n[{time.monotonic() - start:6.1f} s] {name}", end="")

    src, src_b = tmp_path / "src", tmp_path / "src-b"
    for n in range(3):
        synthetic_ct(src / f"study {n}" / "slice.dcm", lesion=n != 1, seed=2000 + n)
    synthetic_ct(src_b / "late study" / "slice.dcm", lesion=True, seed=2003)
    dest, evaluation = tmp_path / "dest", tmp_path / "eval"
    home = tmp_path / "prefect-home"
    home.mkdir()
    # gpt-4o always wrong, claude 0.9/0.9: the models disagree on most studies → flagged
    with (
        prefect_server_process(home, E2E_SERVER) as env,
        running_simulator("--seed", "3", "--profile", "gpt-4o=0,0") as sim,
    ):
        phase("prefect server and simulator up")
        env[KEY_ENV] = TEST_KEY
        models = panel_config(sim.url, KEY_ENV)
        base = {"language": "en", "models": models, "evaluation": {"bootstrap_resamples": 200}}
        config = tmp_path / "radflow.yaml"
        config.write_text(yaml.safe_dump(base | {"review": {"requests": True}}))
        config2 = tmp_path / "radflow-2.yaml"  # short review timeout, measured weights
        config2.write_text(yaml.safe_dump(base | {
            "review": {"requests": True, "timeout_hours": 0.001, "on_timeout": "reopen"},
            "reliability": str(evaluation / "reliability.json"),
        }))  # fmt: skip
        serve_log = tmp_path / "serve.log"
        serve_cmd = [*RADFLOW, "serve", "--only", "flagged", "--poll-seconds", "1"]
        with process(serve_cmd, env, serve_log) as serve:
            try:
                _loop(env, src, src_b, dest, evaluation, config, config2, serve, tmp_path, phase)
            except BaseException:
                print("--- serve log ---\n" + tail(serve_log, 80))
                raise


def _loop(env, src, src_b, dest, evaluation, config, config2, serve, tmp_path, phase) -> None:
    def registered() -> dict | None:
        assert serve.poll() is None, "radflow serve exited"
        answer = httpx.get(env["PREFECT_API_URL"] + "/deployments/name/review/flagged", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    deployment = wait_for("radflow serve registers review/flagged", registered, 600, 0.5)
    phase("review deployment served")

    # 1. screening flags studies and asks for their reviews
    run = run_screen(src, dest, config, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    reports = read_reports(dest)
    flagged = sorted(uid for uid, r in reports.items() if r.consensus.needs_review)
    assert len(reports) == 3 and len(flagged) >= 2, {u: r.consensus for u, r in reports.items()}
    summary = json.loads(next((dest / "runs").glob("*.json")).read_text())
    assert summary["reviews_requested"] == len(flagged)
    phase(f"screened: {len(flagged)} of 3 studies flagged")

    # 2. one review run per flagged study, suspended, named without identifiers
    def suspended() -> list[dict]:
        runs = _review_runs(env, deployment["id"])
        waiting = [r for r in runs if r["state_name"] == "Suspended"]
        return runs if len(runs) == len(flagged) == len(waiting) else []

    runs = wait_for("review runs suspend", suspended, 300, 0.5)
    phase("review runs suspended")
    ids = {uid: review_names(LocalStore(dest)).study(uid) for uid in reports}
    by_uid = {uid: r for uid in flagged for r in runs if r["parameters"]["study"] == ids[uid]}
    assert sorted(by_uid) == flagged
    for uid, r in by_uid.items():
        pseudonym = ids[uid]
        assert uid not in json.dumps(r)  # name, tags, parameters: no UID
        assert (
            r["name"]
            == f"review-ct-{reports[uid].consensus.urgency.value.replace('_', '-')}-{pseudonym}"
        )
        assert not any(part in r["name"] for part in uid.split(".") if len(part) > 4)
        assert {"radflow", "review", f"review:{pseudonym}"} <= set(r["tags"])
        assert r["state_type"] == "PAUSED" and r["state"]["state_details"]["run_input_keyset"]
        state = read_reports(dest)[uid].review
        assert state.status == "pending" and state.flow_run_id == r["id"] and state.expires_at
        page = _artifacts(env, r["id"])[f"review-{pseudonym}"]
        assert page.count("](data:image/png;base64,") == len(reports[uid].images)
        assert "Readings side by side" in page and "SIMULATED" in page and uid not in page
        keyset = r["state"]["state_details"]["run_input_keyset"]
        form = prefect_api(env, "GET", f"/flow_runs/{r['id']}/input/{keyset['description']}")
        assert "data:image/png;base64," in form and uid not in form  # text above the form
    pending = CliRunner().invoke(app, ["reviews", "list", str(dest), "--status", "pending"])
    assert pending.exit_code == 0 and f"{len(flagged)} pending" in pending.output, pending.output

    # 3. the page and the form in the UI (headless Chromium): key images, fields
    if chromium() is not None:
        uid = flagged[0]
        body = {"artifacts": {"key": {"any_": [f"review-{ids[uid]}"]}}}
        (artifact,) = prefect_api(env, "POST", "/artifacts/filter", json=body)
        text = _screenshots(env, by_uid[uid], artifact["id"], tmp_path)
        for field in ("Abnormal", "Urgency", "Findings", "Reviewer initials", "Not assessable"):
            assert field in text, text
        for shot in ("review-page.png", "review-form.png"):
            image = Image.open(tmp_path / shot).convert("RGB")
            assert image.size == (1400, 1600) and len(image.getcolors(1 << 24) or []) > 50
        phase(f"screenshots: {tmp_path}/review-page.png, review-form.png")
    else:
        phase("chromium is not installed (make test installs it on Debian): no screenshot")

    # 4. submitting through the API, as the UI does: a contradiction is refused, answers resume
    first = by_uid[flagged[0]]["id"]
    refused = prefect_api(env, "POST", f"/flow_runs/{first}/resume", json={
        "run_input": {"abnormal": "no", "urgency": "immediate", "reviewer": "KJH"}
    })  # fmt: skip
    assert refused["status"] == "REJECT" and "urgency" in refused["details"]["reason"]
    answers = dict(zip(flagged, ANSWERS, strict=False))
    for uid, answer in answers.items():
        done = prefect_api(
            env, "POST", f"/flow_runs/{by_uid[uid]['id']}/resume", json={"run_input": answer}
        )
        assert done["status"] == "ACCEPT", done

    def completed() -> list[dict]:
        runs = _review_runs(env, deployment["id"])
        assert not [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")], runs
        return runs if all(r["state_type"] == "COMPLETED" for r in runs) else []

    wait_for("review runs complete", completed, 300, 0.5)
    phase("verdicts submitted, review runs completed: " + "; ".join(
        _timeline(env, r) for r in completed()))  # fmt: skip
    reports = read_reports(dest)
    for uid, answer in answers.items():
        verdict = read_verdict(LocalStore(dest), uid)
        assert verdict.reviewer == answer["reviewer"] and verdict.flow_run_id == by_uid[uid]["id"]
        assert verdict.report.created_at == reports[uid].created_at  # the version reviewed
        unsure = answer.get("not_assessable", False)
        assert verdict.abnormal == (None if unsure else answer["abnormal"] == "yes")
        assert (
            reports[uid].review.status == "done"
            and reports[uid].review.reviewer == verdict.reviewer
        )
        verdict_page = _artifacts(env, by_uid[uid]["id"])[f"review-{ids[uid]}-verdict"]
        assert uid not in verdict_page

    # 5. the verdicts are the evaluation's labels, no hand-made file: `radflow reviews export`
    # feeds `radflow evaluate` (and reviews:DEST reads the same labels directly)
    labelled = [u for u, a in answers.items() if not a.get("not_assessable")]
    labels = tmp_path / "labels.csv"
    exported = CliRunner().invoke(app, ["reviews", "export", str(dest), "--out", str(labels)])
    assert exported.exit_code == 0, exported.output
    assert load_labels.fn(f"reviews:{dest}") == parse_labels(labels.read_text(), str(labels))
    run = run_radflow("evaluate", str(labels), "--images", str(src), "--out", str(evaluation),
                      "--config", str(config), env=env, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert sorted(c["study_instance_uid"] for c in metrics["cases"]) == sorted(labelled)
    truth = {c["study_instance_uid"]: c["truth"] for c in metrics["cases"]}
    assert truth == {u: int(answers[u]["abnormal"] == "yes") for u in labelled}
    reliability = json.loads((evaluation / "reliability.json").read_text())
    assert set(reliability["models"]) == {"gpt-4o", "claude"}
    assert _review_runs(env, deployment["id"]) == completed()  # evaluation asked no review
    phase("evaluated on the exported review verdicts")

    # 6. an unanswered review expires (review.timeout_hours)...
    run = run_screen(src_b, dest, config2, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (late,) = [u for u in read_reports(dest) if u not in reports]
    late_id = review_names(LocalStore(dest)).study(late)
    assert read_reports(dest)[late].consensus.needs_review

    def expired() -> dict | None:
        runs = [r for r in _review_runs(env, deployment["id"]) if r["parameters"]["attempt"] == 1]
        mine = [r for r in runs if r["parameters"]["study"] == late_id]
        return mine[0] if mine and mine[0]["state_type"] == "FAILED" else None

    failed = wait_for("the unanswered review expires", expired, 300, 0.5)
    assert "never resumed" in failed["state"]["message"]
    listed = CliRunner().invoke(app, ["reviews", "list", str(dest), "--status", "expired"])
    assert late in listed.output, listed.output
    phase("the late study's review expired")

    # 7. ... and the next screening asks again (on_timeout: reopen); reviewed studies are not
    # asked twice; the consensus now votes with the measured weights
    before = _review_runs(env, deployment["id"])
    run = run_screen(src, dest, config2, "--force", env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    after = _review_runs(env, deployment["id"])
    (new,) = [r for r in after if r["id"] not in {b["id"] for b in before}]
    assert new["parameters"]["study"] == late_id and new["parameters"]["attempt"] == 2
    assert new["name"].endswith("-2")
    reports = read_reports(dest)
    for uid in answers:
        assert reports[uid].review.status == "done"  # restored from review.json, no new run
    for uid in reports:
        if uid != late:
            assert reports[uid].consensus.weights_source == str(evaluation / "reliability.json")
    phase("expired review reopened; reviewed ones kept; measured weights in use")
