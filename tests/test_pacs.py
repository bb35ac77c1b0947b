"""radflow against a real PACS: Orthanc on loopback (DICOMweb plugin, authentication on), the
studies uploaded by STOW-RS, screened from `dicomweb+http://…` with the simulator reading, and
the SRs published back and read again with pydicom."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from flows.screen import screen
from simulator.samples import REAL_SAMPLES, synthetic_ct
from tasks.core.config import StorageConfig
from tasks.core.errors import ConfigError, CorruptDicom
from tasks.pacs.dicomweb import parse_dicomweb_uri
from tasks.pacs.settings import PublishConfig
from tasks.pacs.store import DicomWebStore, header_bytes
from tasks.reports.sr import sr_series_uid
from tests.helpers import (
    PASSWORD_ENV,
    USER_ENV,
    dicomweb_client,
    pacs_config,
    read_reports,
    run_screen,
    sim_calls,
    sr_instances,
)
from tests.pacs_proxy import FaultProxy

SLICES = 40  # the multi-slice synthetic CT: the model sees its middle slice only
CT_UID = "1.2.826.0.1.3680043.10.555.40"
PLAIN_UID = "1.2.826.0.1.3680043.10.555.1"


# -- unit: the URI and hostile metadata ----------------------------------------------------


def test_dicomweb_uri_filters_paging_and_refusals():
    src = parse_dicomweb_uri(
        "dicomweb+https://pacs.example:8443/dicom-web/?StudyDate=20260101-20261231"
        "&ModalitiesInStudy=CT&limit=500&offset=10&0020000D=1.2.3"
    )
    assert src.base_url == "https://pacs.example:8443/dicom-web"
    assert src.root_uri == "dicomweb+https://pacs.example:8443/dicom-web"
    assert src.filters == {
        "StudyDate": "20260101-20261231",
        "ModalitiesInStudy": "CT",
        "StudyInstanceUID": "1.2.3",
    }
    assert (src.limit, src.offset) == (500, 10)
    with pytest.raises(ConfigError, match="must not hold credentials"):
        parse_dicomweb_uri("dicomweb+http://user:secret@pacs/dicom-web")
    with pytest.raises(ConfigError, match='"Nonsense" is not a DICOM attribute'):
        parse_dicomweb_uri("dicomweb+http://pacs/dicom-web?Nonsense=1")
    with pytest.raises(ConfigError, match="limit must be"):
        parse_dicomweb_uri("dicomweb+http://pacs/dicom-web?limit=0")
    # fuzzymatching reads the true/false words of labels and settings (tasks.core.words)
    fuzzy = {
        w: parse_dicomweb_uri(f"dicomweb+http://pacs/d?fuzzymatching={w}").fuzzymatching
        for w in ("true", "YES", "1", "off", "")
    }
    assert fuzzy == {"true": True, "YES": True, "1": True, "off": False, "": None}
    assert parse_dicomweb_uri("dicomweb+http://pacs/d").fuzzymatching is None
    with pytest.raises(ConfigError, match=r'fuzzymatching "maybe" is neither true'):
        parse_dicomweb_uri("dicomweb+http://pacs/dicom-web?fuzzymatching=maybe")


def test_hostile_metadata_fails_as_one_clear_error():
    good = {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00080018": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00280010": {"vr": "US", "Value": [512]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://elsewhere.invalid/pixels"},
    }
    ds = pydicom.dcmread(io.BytesIO(header_bytes(good, "x")))
    assert ds.Rows == 512 and "PixelData" not in ds  # the bulk data URI is never followed
    nested: dict = {"vr": "SQ", "Value": [{}]}
    deep = nested
    for _ in range(5000):
        deep["Value"][0] = {"00081115": {"vr": "SQ", "Value": [{}]}}
        deep = deep["Value"][0]["00081115"]
    for bad in (
        ["not", "an", "object"],
        {"00280010": {"vr": "US", "Value": ["many"]}},
        {"00280010": {"vr": "ZZ", "Value": [1]}},
        {"00081115": nested},
    ):
        with pytest.raises(CorruptDicom, match="metadata|JSON"):
            header_bytes(bad, "studies/1/series/2/instances/3")


# -- e2e against Orthanc ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(orthanc, tmp_path_factory):
    """The five kinds of study of the issue, uploaded by STOW-RS: four pydicom-data files (CT
    J2K, MR, MONOCHROME1 CR, colour US) and a 40-slice synthetic CT; plus one single-slice
    synthetic CT. Returns {StudyInstanceUID: bytes of each instance uploaded}."""
    web = dicomweb_client(orthanc)
    uploaded: dict[str, dict[str, int]] = {}
    paths = [Path(get_testdata_file(name, download=False)) for name in REAL_SAMPLES]
    tmp = tmp_path_factory.mktemp("pacs-studies")
    series = "1.2.826.0.1.3680043.10.555.40.1"
    for i in range(SLICES):
        paths.append(
            synthetic_ct(
                tmp / f"ct-{i:02d}.dcm",
                lesion=i > 15,
                seed=500 + i,
                study_uid=CT_UID,
                series_uid=series,
                instance=i + 1,
                phi={"PatientID": "SYN-CT40", "PatientName": "SYNTHETIC^CT40"},  # one patient
            )
        )
    paths.append(synthetic_ct(tmp / "plain.dcm", lesion=False, seed=7, study_uid=PLAIN_UID))
    for path in paths:
        ds = pydicom.dcmread(path)
        answer = web.store_instances([ds])
        assert not answer.get("FailedSOPSequence"), answer
        uploaded.setdefault(ds.StudyInstanceUID, {})[ds.SOPInstanceUID] = path.stat().st_size
    assert len(uploaded) == 6 and len(uploaded[CT_UID]) == SLICES
    return uploaded


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)


@pytest.mark.e2e
def test_screen_a_pacs_publish_back_and_rerun(
    prefect_harness, simulator, orthanc, pacs, pacs_env, tmp_path, capsys
):
    dest = tmp_path / "out"
    config = pacs_config(simulator, tmp_path, publish={"dicomweb": "same"})
    proxy = FaultProxy(orthanc.url)  # no faults: it only counts what is asked
    with proxy:
        _screen_publish_rerun(proxy, simulator, orthanc, pacs, dest, config, tmp_path, capsys)


def _screen_publish_rerun(proxy, simulator, orthanc, pacs, dest, config, tmp_path, capsys):
    source = f"dicomweb+{proxy.url}/dicom-web"
    summary = asyncio.run(screen(source + "?limit=2", str(dest), config))
    asked = list(proxy.requests)

    # every study reported exactly once, nothing else
    reports = read_reports(dest)
    assert set(reports) == set(pacs) and summary.reported == 6 == summary.studies
    assert summary.errors == 0 and not list(dest.glob("errors/*.json"))
    # paging: pages of 2 (offset 0, 2, 4), then one empty page; plus the check's search
    searches = [q for m, path, q in asked if m == "GET" and path == "/dicom-web/studies"]
    assert [dict(p.split("=") for p in q.split("&"))["offset"] for q in searches] == [
        "0", "0", "2", "4", "6",
    ]  # fmt: skip
    # the 40-slice CT: one study metadata request and one instance retrieved (its middle
    # slice); the SR evidence asked for that instance's metadata again, no pixels
    ct = reports[CT_UID]
    mine = [p for m, p, _ in asked if m == "GET" and f"/studies/{CT_UID}/" in p]
    retrieved = [p for p in mine if p.rsplit("/", 1)[-1] in pacs[CT_UID]]
    assert retrieved == [
        f"/dicom-web/studies/{CT_UID}/series/{ct.images[0].series_instance_uid}"
        f"/instances/{ct.images[0].sop_instance_uid}"
    ]
    assert mine.count(f"/dicom-web/studies/{CT_UID}/metadata") == 1
    key_bytes = pacs[CT_UID][ct.images[0].sop_instance_uid]
    series_bytes = sum(pacs[CT_UID].values())
    assert ct.fetched_bytes == summary.fetched_bytes_by_study[CT_UID]
    assert abs(ct.fetched_bytes - key_bytes) < 1024  # the key slice (as re-encoded), no more
    assert series_bytes > 30 * ct.fetched_bytes
    with capsys.disabled():
        print(
            f"\n40-slice CT over DICOMweb: {ct.fetched_bytes} bytes fetched for its key image "
            f"(the series is {series_bytes} bytes); discovery (searches + metadata of 6 "
            f"studies): {summary.discovery_bytes} bytes"
        )

    # each study gained one SR series in Orthanc, readable by pydicom, linked to the study
    # and referencing the instances it was read from
    assert summary.published == 6 and not summary.publish_failed
    for uid, report in reports.items():
        assert report.published.state == "stored" and report.published.attempts == 1
        (sr,) = sr_instances(orthanc, uid)
        assert sr.SOPInstanceUID == report.published.sop_instance_uid
        assert sr.StudyInstanceUID == uid and sr.Modality == "SR"
        assert sr.SeriesInstanceUID == sr_series_uid(uid) != report.images[0].series_instance_uid
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert evidence == {i.sop_instance_uid for i in report.images} <= set(pacs[uid])
        local = pydicom.dcmread(dest / "studies" / uid / "report.sr.dcm")
        assert local.SOPInstanceUID == sr.SOPInstanceUID
    run = json.loads(next(dest.glob("runs/*.json")).read_text())
    assert run["fetched_bytes_by_study"][CT_UID] == ct.fetched_bytes and run["published"] == 6

    # a second run reads nothing, publishes nothing
    calls = sim_calls(simulator)
    again = asyncio.run(screen(source, str(dest), config))
    assert again.skipped == 6 and again.reported == 0 and sim_calls(simulator) == calls
    assert all(len(sr_instances(orthanc, uid)) == 1 for uid in pacs)

    # --force: the same readings (from the reading cache) make the same report version: the
    # SR is already there, nothing is added
    forced = asyncio.run(screen(source, str(dest), config, force=True))
    assert forced.reported == 6 and forced.published == 6 and sim_calls(simulator) == calls
    assert {r.published.state for r in read_reports(dest).values()} == {"already_stored"}
    assert all(len(sr_instances(orthanc, uid)) == 1 for uid in pacs)

    # --force after what the report says changed (here: its language) supersedes: a second
    # instance of the SR series, numbered 2, naming the first as its predecessor
    (tmp_path / "ko").mkdir()
    korean = pacs_config(simulator, tmp_path / "ko", language="ko", publish={"dicomweb": "same"})
    one = f"{source}?StudyInstanceUID={PLAIN_UID}"
    new = asyncio.run(screen(one, str(dest), korean, force=True))
    assert new.reported == 1 and new.published == 1
    first, second = sorted(sr_instances(orthanc, PLAIN_UID), key=lambda ds: ds.InstanceNumber)
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    (pred,) = second.PredecessorDocumentsSequence
    assert pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        first.SOPInstanceUID
    )
    report = read_reports(dest)[PLAIN_UID]
    assert report.published.supersedes == [first.SOPInstanceUID] and report.language == "ko"


@pytest.mark.e2e
def test_a_date_filter_selects_a_subset(
    prefect_harness, simulator, orthanc, pacs, pacs_env, tmp_path
):
    """`radflow screen` as a command on a QIDO-RS date filter (and pages of one study)."""
    dest = tmp_path / "dated"
    source = f"{orthanc.dicomweb}?StudyDate=20260101-20261231&limit=1"
    config = pacs_config(simulator, tmp_path)
    proc = run_screen(source, dest, config, api_url=prefect_harness, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reported 2/2 studies" in proc.stdout
    assert "fetched 0.25 MiB of source instances (129 KiB per study read)" in proc.stdout
    assert set(read_reports(dest)) == {CT_UID, PLAIN_UID}
    assert all(r.published is None for r in read_reports(dest).values())
    assert orthanc.password not in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_bad_server_answers_become_error_records(
    prefect_harness, simulator, orthanc, pacs, pacs_env, tmp_path
):
    """One study's metadata 401, one study gone (404) between search and retrieve, 503
    twice then OK, a non-DICOM part in a retrieve: clear error records, the rest reported."""
    real = {
        pydicom.dcmread(get_testdata_file(n, download=False)).StudyInstanceUID: n
        for n in REAL_SAMPLES
    }
    forbidden, gone, flaky, junk = sorted(real)
    rules = [
        ("GET", f"/studies/{forbidden}/metadata", 401, 99),
        ("GET", f"/studies/{gone}/series/", 404, 99),
        ("GET", f"/studies/{flaky}/metadata", 503, 2),
        ("GET", f"/studies/{flaky}/series/", 503, 2),
        ("GET", f"/studies/{junk}/series/", "text-part", 99),
    ]
    dest = tmp_path / "faults"
    with FaultProxy(orthanc.url, rules) as proxy:
        source = f"dicomweb+{proxy.url}/dicom-web"
        summary = asyncio.run(screen(source, str(dest), pacs_config(simulator, tmp_path)))
    reports = read_reports(dest)
    assert set(reports) == {flaky, CT_UID, PLAIN_UID} and summary.reported == 3
    errors = {
        e["source"]: e for e in map(json.loads, map(Path.read_text, dest.glob("errors/*.json")))
    }
    by_study = {}
    for source_uri, record in errors.items():
        by_study.setdefault(source_uri.split("/studies/")[1].split("/")[0], []).append(record)
    assert set(by_study) == {forbidden, gone, junk}
    (denied,) = by_study[forbidden]
    assert denied["source"].endswith(f"/studies/{forbidden}")
    assert (
        f"401 from PACS at {proxy.url}/dicom-web/studies/{forbidden}/metadata" in denied["reason"]
    )
    assert f"check credentials in {USER_ENV} and {PASSWORD_ENV}" in denied["reason"]
    (missing,) = by_study[gone]
    assert missing["kind"] == "ObjectMissing" and "404 from PACS" in missing["reason"]
    (notdicom,) = by_study[junk]
    assert notdicom["kind"] == "NotDicom" and "not a DICOM file" in notdicom["reason"]
    assert proxy.hits[2] == proxy.hits[3] == 2  # 503 twice each, then the real answer
    assert orthanc.password not in json.dumps([*errors.values()])


@pytest.mark.e2e
def test_a_401_on_the_search_is_one_line_and_no_run(orthanc, pacs, tmp_path, monkeypatch):
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password-never-logged")
    config = tmp_path / "radflow.yaml"
    auth = {"auth": "basic", "username_env": USER_ENV, "password_env": PASSWORD_ENV}
    config.write_text(yaml.safe_dump({"dicomweb": auth}))
    proc = run_screen(orthanc.dicomweb, tmp_path / "o", config, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"401 from PACS at {orthanc.url}/dicom-web/studies" in proc.stderr
    assert f"check credentials in {USER_ENV} and {PASSWORD_ENV}" in proc.stderr
    assert "wrong-password-never-logged" not in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_failed_publishing_is_recorded_then_retried_by_the_next_run(
    prefect_harness, simulator, orthanc, pacs, pacs_env, tmp_path
):
    own = "1.2.826.0.1.3680043.10.555.99"  # a study of its own: no other test publishes it
    path = synthetic_ct(
        tmp_path / "own.dcm", lesion=True, seed=99, study_uid=own, phi={"StudyDate": "20250101"}
    )
    dicomweb_client(orthanc).store_instances([pydicom.dcmread(path)])
    dest = tmp_path / "stow"
    target = {"publish": {"dicomweb": "same"}, "dicomweb": {"max_attempts": 3}}
    one = f"?StudyInstanceUID={own}"
    with FaultProxy(orthanc.url, [("POST", "/dicom-web/studies", 503, 99)]) as proxy:
        config = pacs_config(simulator, tmp_path, **target)
        failed = asyncio.run(screen(f"dicomweb+{proxy.url}/dicom-web{one}", str(dest), config))
        assert proxy.hits[0] == 3  # the configured attempts, no more
    assert failed.reported == 1 and failed.publish_failed == [own] and failed.published == 0
    report = read_reports(dest)[own]
    assert report.published.state == "failed" and report.published.attempts == 3
    assert "503" in report.published.error
    run = json.loads(next(dest.glob("runs/*.json")).read_text())
    assert run["publish_failed"] == [own]
    # the next run (server fine again) publishes it, reading nothing again
    calls = sim_calls(simulator)
    done = asyncio.run(screen(f"{orthanc.dicomweb}{one}", str(dest), config))
    assert done.reported == 1 and sim_calls(simulator) == calls
    assert read_reports(dest)[own].published.state == "stored"
    assert len(sr_instances(orthanc, own)) == 1


@pytest.mark.e2e
def test_key_images_in_a_pool_process_reopen_the_store_by_uri(orthanc, pacs, pacs_env):
    """``runner.preprocess: process``: a pool process reopens the DICOMweb store from its URI
    and settings (credentials from its environment), retrieves the key instance and reads
    the SR evidence header from instance metadata (it has no headers kept from discovery)."""
    from tasks.core.config import PreprocessConfig, RunnerConfig, Settings
    from tasks.imaging.studyimages import prepare_study
    from tasks.ingest.discover import discover_studies
    from tasks.reports.sr import read_evidence
    from tasks.screening.pool import off_loop, shutdown_pools

    auth = {"auth": "basic", "username_env": USER_ENV, "password_env": PASSWORD_ENV}
    storage = Settings.model_validate({"dicomweb": auth}).storage
    store = DicomWebStore(f"{orthanc.dicomweb}?StudyInstanceUID={CT_UID}", storage)
    (study,) = discover_studies(store).studies
    runner = RunnerConfig(preprocess="process", workers=1)
    try:
        images, errors = asyncio.run(
            off_loop(runner, storage, prepare_study, [store], study, PreprocessConfig())
        )
        (inst, image), evidence = images[0], [(images[0][0].ref.key, images[0][0].ref.uri)]
        (header,) = asyncio.run(off_loop(runner, storage, read_evidence, [store], evidence))
    finally:
        shutdown_pools()
    assert not errors and len(images) == 1
    assert image.source_bytes == pytest.approx(pacs[CT_UID][inst.sop_instance_uid], abs=1024)
    assert header.SOPInstanceUID == inst.sop_instance_uid and "PixelData" not in header


@pytest.mark.e2e
def test_store_pickles_and_a_dest_on_a_pacs_is_refused(orthanc, pacs, pacs_env):
    import pickle

    from tasks.core.config import Settings
    from tasks.pacs.publish import check_pacs_settings, publish_target

    settings = Settings.model_validate(
        {"dicomweb": {"auth": "basic", "username_env": USER_ENV, "password_env": PASSWORD_ENV}}
    )
    store = DicomWebStore(orthanc.dicomweb, settings.storage)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri and set(pacs) <= set(copy.studies())
    with pytest.raises(ConfigError, match="is a DICOMweb server"):
        check_pacs_settings(settings, "/data", orthanc.dicomweb)
    same = settings.model_copy(update={"publish": PublishConfig(dicomweb="same")})
    assert publish_target(same, "s3://scans/in/") is None  # nothing to publish back to
    assert publish_target(same, f"{orthanc.dicomweb}?ModalitiesInStudy=CT").uri == (
        orthanc.dicomweb
    )
    with pytest.raises(ConfigError, match="takes no query"):
        elsewhere = PublishConfig(dicomweb=f"{orthanc.dicomweb}?StudyDate=2026")
        publish_target(settings.model_copy(update={"publish": elsewhere}), "/data")
    assert StorageConfig().dicomweb.auth == "none"


def test_the_compose_overlay_wires_orthanc_the_bridge_and_the_worker():
    from tasks.core.config import Settings

    infra = Path(__file__).resolve().parent.parent / "infra"
    overlay = yaml.safe_load((infra / "docker-compose.pacs.yml").read_text())["services"]
    config = Settings.model_validate(yaml.safe_load((infra / "radflow.compose.yaml").read_text()))
    orthanc = overlay["orthanc"]
    assert orthanc["image"].startswith("orthancteam/orthanc:") and ":latest" not in orthanc["image"]
    env = orthanc["environment"]
    assert (
        env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
        and env["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    )
    assert all(port.startswith("127.0.0.1:") for port in orthanc["ports"])
    bridge = overlay["orthanc-bridge"]["command"]
    assert bridge[:2] == ["radflow", "bridge"]
    assert bridge[bridge.index("--orthanc") + 1] == "http://orthanc:8042"
    assert bridge[bridge.index("--dicomweb-root") + 1] + "/" == env["ORTHANC__DICOM_WEB__ROOT"]
    assert config.publish.dicomweb == "same" and config.dicomweb.auth == "basic"
    for service in ("orthanc-bridge", "radflow-worker"):
        names = set(overlay[service]["environment"])
        assert {config.dicomweb.username_env, config.dicomweb.password_env} <= names, service


def test_auth_settings_name_their_variables_and_never_hold_secrets(monkeypatch):
    from tasks.pacs.dicomweb import PacsClient
    from tasks.pacs.settings import DicomWebConfig

    with pytest.raises(ValueError, match="basic needs username_env and password_env"):
        DicomWebConfig(auth="basic", username_env="U")
    with pytest.raises(ValueError, match="bearer needs token_env"):
        DicomWebConfig(auth="bearer")
    bearer = DicomWebConfig(auth="bearer", token_env="RADFLOW_TEST_PACS_TOKEN")
    monkeypatch.delenv("RADFLOW_TEST_PACS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match='"RADFLOW_TEST_PACS_TOKEN" for dicomweb.auth: bearer'):
        PacsClient("https://pacs.invalid/dicom-web", bearer)
    monkeypatch.setenv("RADFLOW_TEST_PACS_TOKEN", "token-never-written")
    client = PacsClient("https://pacs.invalid/dicom-web", bearer)
    assert client.session.headers["Authorization"] == "Bearer token-never-written"
    assert "token-never-written" not in repr(client.__getstate__())
    private = DicomWebConfig(ca_bundle="/etc/ssl/hospital-ca.pem")
    assert PacsClient("https://pacs.invalid/dicom-web", private).session.verify == (
        "/etc/ssl/hospital-ca.pem"
    )
    error = client.http_error(
        "QIDO-RS study search", "https://pacs.invalid/dicom-web/studies", None
    )
    assert "check credentials" not in str(error)  # no response: not an auth failure
