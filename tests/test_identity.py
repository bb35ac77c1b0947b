"""Patient and instance identity, end to end: instances of one StudyInstanceUID that belong to
different patients, one SOPInstanceUID in two studies or series, duplicate copies of one
instance, and a rewritten report's stale key images (local DEST and S3 through moto_server)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import boto3
import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from flows.screen import screen
from simulator.hostile import PATIENTS, build_identity_folder
from simulator.process import running_simulator
from simulator.samples import synthetic_ct
from tasks.core.config import PreprocessConfig
from tasks.core.errors import RadflowError
from tasks.core.schema import Report
from tasks.imaging.preprocess import prepare_all
from tasks.imaging.studyimages import prepare_study
from tasks.ingest.discover import discover_studies
from tasks.storage import LocalStore
from tests.helpers import read_errors, read_reports, run_screen, sim_config

_PNG = re.compile(r'(?:data:image/png;base64,|"data":\s*")([A-Za-z0-9+/=]+)')


def _sent_images(bodies: dict[str, list[str]]) -> list[list[str]]:
    """The sha256 of every PNG in each recorded model request, one list per request."""
    return [
        [hashlib.sha256(base64.b64decode(m.group(1))).hexdigest() for m in _PNG.finditer(body)]
        for requests in bodies.values()
        for body in requests
    ]


def _rendered(path: Path) -> set[str]:
    """The sha256 of what each provider would be sent of ``path`` (none if it cannot render)."""
    try:
        images = prepare_all(str(path), PreprocessConfig(), providers=("openai", "anthropic"))
    except RadflowError:
        return set()
    return {hashlib.sha256(i.for_provider(p)).hexdigest() for i in images for p in i.sized}


STUDY = "1.2.826.0.1.3680043.8.498.15001"


def _slice(folder: Path, name: str, seed: int, series: int, **tags: str) -> Path:
    """A CT slice of STUDY in its own series (or ``series``), with the identity ``tags``."""
    return synthetic_ct(folder / name, lesion=False, seed=seed, size=64, study_uid=STUDY,
                        series_uid=f"{STUDY}.{series}", phi=tags)  # fmt: skip


def _patient(key: str, **override: str) -> dict[str, str]:
    pid, name, birth = PATIENTS[key]
    return {"PatientID": pid, "PatientName": name, "PatientBirthDate": birth, **override}


def test_the_majority_patient_keeps_the_study_and_the_others_are_error_records(tmp_path):
    _slice(tmp_path, "a1.dcm", 1, 1, **_patient("A"))
    _slice(tmp_path, "a2.dcm", 2, 2, **_patient("A", PatientName=" alpha^anna^^ "))
    _slice(tmp_path, "anonymous.dcm", 3, 3, PatientID="", PatientName="", PatientBirthDate="")
    _slice(tmp_path, "b.dcm", 4, 4, **_patient("B", PatientBirthDate=PATIENTS["A"][2]))
    inventory = discover_studies(LocalStore(tmp_path))
    (study,) = inventory.studies
    assert sorted(Path(i.ref.key).name for i in study.instances) == [
        "a1.dcm",
        "a2.dcm",
        "anonymous.dcm",
    ]
    (record,) = inventory.errors
    assert record.kind == "IdentityConflict" and record.source.endswith("/b.dcm")
    assert record.study_instance_uid == STUDY
    assert "PatientID, PatientName differ from the 3 other instances" in record.reason
    assert not [v for patient in PATIENTS.values() for v in patient if v in record.reason]


def test_without_a_strict_majority_every_instance_is_an_error_record(tmp_path):
    a = _slice(tmp_path, "a.dcm", 1, 1, **_patient("A"))
    (tmp_path / "a copy.dcm").write_bytes(a.read_bytes())  # one instance: counted once
    _slice(tmp_path, "b.dcm", 2, 2, **_patient("B", PatientName="", PatientBirthDate=""))
    inventory = discover_studies(LocalStore(tmp_path))
    assert inventory.studies == []
    assert sorted(Path(r.source).name for r in inventory.errors) == ["a copy.dcm", "a.dcm", "b.dcm"]
    for record in inventory.errors:
        assert record.kind == "IdentityConflict"
        assert f"StudyInstanceUID {STUDY} holds instances of 2 different patients " in (
            record.reason
        )
        assert "(PatientID differs): not read" in record.reason


def test_one_sop_instance_uid_in_two_studies_or_series_fails_every_copy(tmp_path):
    sop = "1.2.826.0.1.3680043.8.498.15002"
    for name, study, series in (("x", STUDY, 1), ("y", STUDY + ".9", 1), ("z", STUDY, 2)):
        path = _slice(tmp_path, f"{name}.dcm", 5, series, **_patient("A"))
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SOPInstanceUID = study, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(path)
    _slice(tmp_path, "other.dcm", 6, 1, **_patient("A"))
    inventory = discover_studies(LocalStore(tmp_path))
    (study,) = inventory.studies
    assert [Path(i.ref.key).name for i in study.instances] == ["other.dcm"]
    reasons = {Path(r.source).name: r.reason for r in inventory.errors}
    assert sorted(reasons) == ["x.dcm", "y.dcm", "z.dcm"]
    assert {r.kind for r in inventory.errors} == {"IdentityConflict"}
    assert f"SOPInstanceUID {sop} is also in study {STUDY}.9" in reasons["x.dcm"]
    assert f"is also in series {STUDY}.1" in reasons["z.dcm"]


def test_a_copy_that_does_not_render_gives_way_to_one_that_does(tmp_path):
    good = _slice(tmp_path, "b good.dcm", 7, 1, **_patient("C"))
    data = good.read_bytes()
    (tmp_path / "a cut.dcm").write_bytes(data[: len(data) - 2000])  # pixel data cut short
    (tmp_path / "c same bytes.dcm").write_bytes(data)
    store = LocalStore(tmp_path)
    inventory = discover_studies(store)
    assert inventory.errors == []  # copies are resolved when their pixels are read
    (study,) = inventory.studies
    (instance,) = study.instances
    assert [Path(c.ref.key).name for c in instance.copies] == [
        "a cut.dcm",
        "b good.dcm",
        "c same bytes.dcm",
    ]
    assert sorted(Path(r.uri).name for r in study.objects) == sorted(
        p.name for p in tmp_path.iterdir()
    )
    images, errors = prepare_study(store, study, PreprocessConfig())
    assert [inst.ref.uri for inst, _ in images] == [str(good)]
    reasons = {Path(r.source).name: (r.kind, r.reason) for r in errors}
    assert reasons["a cut.dcm"][0] == "CorruptDicom"
    assert f'its copy "{good}" was read instead' in reasons["a cut.dcm"][1]
    assert reasons["c same bytes.dcm"][0] == "DuplicateInstance"
    assert f'already read from "{good}"' in reasons["c same bytes.dcm"][1]
    assert sorted(reasons) == ["a cut.dcm", "c same bytes.dcm"]


def test_local_store_lists_and_deletes_under_a_prefix(tmp_path):
    store = LocalStore(tmp_path)
    for key in ("s/1/images/a.png", "s/1/images/b.png", "s/1/report.json", "s/10/images/c.png"):
        store.write_bytes(key, b"x")
    assert store.list_keys("s/1/images/") == ["s/1/images/a.png", "s/1/images/b.png"]
    assert store.list_keys("s/2/images/") == []
    store.delete("s/1/images/a.png")
    store.delete("s/1/images/a.png")  # already gone: not an error
    assert store.list_keys("s/1/") == ["s/1/images/b.png", "s/1/report.json"]


@pytest.mark.e2e
def test_identity_conflicts_are_error_records_and_no_request_mixes_patients(
    prefect_harness, tmp_path
):
    source, dest = tmp_path / "in", tmp_path / "out"
    made = build_identity_folder(source)
    with running_simulator("--seed", "15", "--record-bodies") as sim:
        run = run_screen(source, dest, sim_config(sim, tmp_path), api_url=prefect_harness)
        requests = _sent_images(sim.bodies())
    assert run.returncode == 0, run.stderr[-3000:]

    # every file ends in exactly one report's sources or exactly one error record
    reports, errors = read_reports(dest), read_errors(dest)
    by_file = {rel: [e for e in errors if e["source"] == str(source / rel)] for rel in made}
    reported = Counter(s for r in reports.values() for s in r.sources)
    for rel, expected in made.items():
        if expected.kind == "report":
            assert reported[str(source / rel)] == 1 and not by_file[rel], (rel, by_file[rel])
        else:
            assert reported[str(source / rel)] == 0, rel
            assert [e["kind"] for e in by_file[rel]] == [expected.kind], (rel, by_file[rel])
    assert len(errors) == sum(e.kind != "report" for e in made.values())

    # each record names the conflict, never the identifiers
    reason = {rel: records[0]["reason"] for rel, records in by_file.items() if records}
    for rel in ("mixed/patient A.dcm", "mixed/patient B.dcm", "mixed/patient C.dcm"):
        assert "holds instances of 3 different patients" in reason[rel], reason[rel]
        assert "PatientID" in reason[rel] and "not read" in reason[rel]
    assert "PatientID, PatientName, PatientBirthDate differ" in reason["majority/b.dcm"]
    assert "PatientBirthDate differs" in reason["majority/a-4 other birth date.dcm"]
    for rel in ("sop in two studies/0.dcm", "sop in two studies/1.dcm"):
        assert "is also in study" in reason[rel] and "not read" in reason[rel]
    assert "is also in series" in reason["sop in two series/0.dcm"]
    good_copy = source / "copies/b good copy.dcm"
    assert "truncated" in reason["copies/a cut copy.dcm"]
    assert f'its copy "{good_copy}" was read instead' in reason["copies/a cut copy.dcm"]
    assert f'already read from "{good_copy}"' in reason["copies/c same bytes.dcm"]
    identifiers = [v for patient in PATIENTS.values() for v in patient]
    everything = json.dumps(errors) + run.stdout + run.stderr
    assert [v for v in identifiers if v in everything] == []

    # the studies: the good one, patient A's majority (3 of its 5 instances), the series
    # study from its one sound instance, the copies' study from the good copy
    assert len(reports) == 4
    majority = next(r for r in reports.values() if len(r.sources) == 3)
    assert sorted(Path(s).name for s in majority.sources) == [
        "a-1.dcm",
        "a-2 name spelled differently.dcm",
        "a-3 no identifiers.dcm",
    ]
    copies = next(r for r in reports.values() if str(good_copy) in r.sources)
    assert [i.source for i in copies.images] == [str(good_copy)]

    # on the wire: every request holds one patient's images, only from reported files
    sent_by: dict[str, list[str]] = {}  # what each file renders to → the files (copies alike)
    for rel in made:
        for sha in _rendered(source / rel):
            sent_by.setdefault(sha, []).append(rel)
    per_request = [{made[r].patient for sha in shas for r in sent_by[sha]} for shas in requests]
    assert len(requests) == 2 * len(reports)
    for sha in {sha for shas in requests for sha in shas}:  # only what a report lists was sent
        assert "report" in {made[r].kind for r in sent_by[sha]}, sent_by[sha]
    assert all(len(patients) == 1 for patients in per_request), per_request
    assert max(map(len, requests)) == 3  # the majority study: its three sound series

    # the SR and the FHIR subject name the patient whose images were read
    for uid, report in reports.items():
        (patient,) = {made[str(Path(s).relative_to(source))].patient for s in report.sources}
        folder = dest / "studies" / uid
        sr = pydicom.dcmread(folder / "report.sr.dcm")
        assert (sr.PatientID, sr.PatientBirthDate) == PATIENTS[patient][::2], uid
        fhir = DiagnosticReport.model_validate_json((folder / "report.fhir.json").read_text())
        assert fhir.subject.identifier.value == PATIENTS[patient][0]
    uids = {pydicom.dcmread(source / rel, stop_before_pixels=True).StudyInstanceUID for rel in made}
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(e["kind"] for e in errors).items()))
    print(
        f"\nRELIABILITY identity: {len(made)} files under {len(uids)} StudyInstanceUIDs (3 "
        f"patients in one study; a study of 5 whose majority patient keeps 3; one "
        f"SOPInstanceUID in two studies, one in two series; a cut copy listed before its good "
        f"copy and a third) → {len(errors)} error records ({kinds}), {len(reports)} studies "
        f"reported, {len(requests)} model requests each of one patient, 0 identifiers in "
        f"records or logs, SR and FHIR name the patient read"
    )


def _two_series_study(folder: Path) -> list[Path]:
    study = "1.2.826.0.1.3680043.8.498.15003"
    return [
        synthetic_ct(
            folder / f"series {n}.dcm",
            lesion=n == 0,
            seed=760 + n,
            size=96,
            study_uid=study,
            series_uid=f"{study}.{n + 1}",
        )  # fmt: skip
        for n in range(2)
    ]


def _s3_keys(bucket: str, prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rewritten_report_removes_the_key_images_it_no_longer_references(
    prefect_harness, simulator, request, tmp_path, where
):
    source = tmp_path / "in"
    first, second = _two_series_study(source)
    if where == "s3":
        request.getfixturevalue("moto_server")
        boto3.client("s3").create_bucket(Bucket="rewrite")
        out = "s3://rewrite/out"

        def images() -> list[str]:
            keys = _s3_keys("rewrite", "out/studies/")
            return [k.removeprefix("out/") for k in keys if "/images/" in k]

        def report() -> Report:
            (key,) = [k for k in _s3_keys("rewrite", "out/studies/") if k.endswith("report.json")]
            body = boto3.client("s3").get_object(Bucket="rewrite", Key=key)["Body"].read()
            return Report.model_validate_json(body)
    else:
        dest = tmp_path / "out"
        out = str(dest)

        def images() -> list[str]:
            return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("images/*.png"))

        def report() -> Report:
            (only,) = read_reports(dest).values()
            return only

    config = str(sim_config(simulator, tmp_path))
    asyncio.run(screen(str(source), out, config))
    before = images()
    assert len(before) == 2 and len(report().images) == 2
    second.unlink()  # the study changed: the next run rewrites its report from one series
    again = asyncio.run(screen(str(source), out, config))
    assert again.reported == 1
    after = images()
    uid = report().study_instance_uid
    assert after == [f"studies/{uid}/images/{i.sha256[:16]}.png" for i in report().images]
    assert len(after) == 1 and set(after) < set(before)
    forced = asyncio.run(screen(str(source), out, config, force=True))
    assert forced.reported == 1 and images() == after  # a rewrite keeps what it references
    print(
        f"\nRELIABILITY stale images ({where}): report rewritten from 1 of 2 series → "
        f"{len(before)} key images before, {len(after)} after (the one it references)"
    )
