"""Reports: the published JSON Schema, report.md in ko/en, the DICOM SR and the FHIR
DiagnosticReport read back with their standard readers, the review queue; and end to end
with a panel that disagrees, one that agrees, and a model-written impression."""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import highdicom as hd
import jsonschema
import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError
from pydicom.data import get_testdata_file

from flows.screen import screen
from simulator.process import panel_config, running_simulator
from tasks.core.config import SynthesisConfig
from tasks.core.errors import ReportError
from tasks.core.schema import (
    ImageInfo,
    Impression,
    Report,
    RunSummary,
    Urgency,
)
from tasks.reports.fhir import build_fhir, fhir_json
from tasks.reports.markdown import render_markdown
from tasks.reports.sr import build_sr, content_tree, device_uid, evidence_dataset, sr_bytes
from tasks.reports.write import (
    render_review_table,
    report_schema,
    review_entry,
    validate_report,
    write_report,
    write_run_summary,
)
from tasks.storage import LocalStore
from tests.helpers import KEY_ENV, make_report, panel_readings, read_reports, sim_config
from tests.sr_reference import TIME_DEPENDENT, differences, highdicom_sr, sr_cases

SCHEMA_FILE = Path(__file__).parent.parent / "schemas" / "report.schema.json"


def _report(ds: pydicom.Dataset, language: str = "en", disagree: bool = True, **extra) -> Report:
    """The panel's report of ``ds``, its one key image from ``ds``."""
    return make_report(
        ds.StudyInstanceUID,
        panel_readings(disagree),
        language=language,
        images=[
            ImageInfo(
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                source="ct.dcm",
                sha256="ab" * 32,
                width=128,
                height=128,
                window="lung",
                frame=None,
                modality="CT",
            )
        ],
        **extra,
    )


@pytest.fixture
def ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def test_published_schema_is_up_to_date():
    published = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert published == report_schema(), (
        "schemas/report.schema.json is stale: regenerate it with `make schema`"
    )
    jsonschema.Draft202012Validator.check_schema(published)


def test_schema_rejects_a_report_without_consensus(ct):
    data = json.loads(_report(ct).model_dump_json())
    validate_report(data)
    del data["consensus"]
    with pytest.raises(ReportError, match="'consensus' is a required property"):
        validate_report(data)
    data = json.loads(_report(ct).model_dump_json())
    data["consensus"]["agreement"] = 1.5
    with pytest.raises(ReportError, match="invalid at consensus/agreement"):
        validate_report(data)


def test_korean_markdown_localises_review_reasons_and_marks_the_impression(ct):
    impression = Impression(
        ok=True,
        text="두 모델 중 하나가 결절을 보고했습니다.",
        language="ko",
        model="claude",
        provider="anthropic",
        model_id="claude-sonnet-4-6",
        prompt_version="impression-v1-x",
    )
    md = render_markdown(_report(ct, "ko", impression=impression))
    assert "모델 간 이상 여부 불일치" in md and "models disagree" not in md
    assert "## 인상" in md and "모델 claude (claude-sonnet-4-6)이(가)" in md
    assert "두 모델 중 하나가 결절을 보고했습니다." in md
    assert "Nodule in the right upper lobe (gpt-4o)" in md
    en = render_markdown(_report(ct, "en"))
    assert "models disagree on abnormal" in en and "## Impression" not in en


def test_sr_round_trips_in_the_source_study_with_device_observers(ct):
    report = _report(ct)
    raw = sr_bytes(build_sr(report, [evidence_dataset(ct, "ct.dcm")]))
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(raw))
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert back.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert back.StudyInstanceUID == ct.StudyInstanceUID
    assert back.PatientID == ct.PatientID and back.PatientName == ct.PatientName
    assert back.SeriesInstanceUID != ct.SeriesInstanceUID
    assert (back.PreliminaryFlag, back.CompletionFlag, back.VerificationFlag) == (
        "PRELIMINARY",
        "PARTIAL",
        "UNVERIFIED",
    )
    ref = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert ref.StudyInstanceUID == ct.StudyInstanceUID
    series = ref.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID

    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    items = list(walk(back.ContentSequence))
    devices = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121013"]
    assert devices == ["gpt-4o", "claude"]  # Device Observer Name (TID 1004)
    uids = [i.UID for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert uids == [device_uid("gpt-4o", "gpt-4o"), device_uid("claude", "claude-sonnet-4-6")]
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert "Nodule in the right upper lobe [gpt-4o]" in texts
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    codes = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ValueType == "CODE"
    }
    assert codes["121077"] == "Abnormal" and codes["needs_review"] == "Yes"
    assert codes["urgency"] == "Follow-up"


def test_sr_needs_the_key_images_among_its_evidence(ct):
    other = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    with pytest.raises(ValueError, match="not among the SR evidence"):
        build_sr(_report(ct), [evidence_dataset(other, "mr.dcm")])
    del other.SOPClassUID
    with pytest.raises(Exception, match='"mr.dcm" has no SOPClassUID'):
        evidence_dataset(other, "mr.dcm")


def test_sr_keeps_a_one_component_patient_name_without_a_warning(ct):
    ct.PatientName = "CQ500-CT-310"  # as in pydicom-data's 693_J2KR.dcm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_sr(_report(ct), [evidence_dataset(ct, "ct.dcm")])
    assert sr.PatientName == "CQ500-CT-310"  # copied as it is
    assert [str(w.message)[:60] for w in caught] == []


def _stamp(ours: pydicom.Dataset, reference: pydicom.Dataset) -> None:
    """Give ``ours`` the reference's values at the TIME_DEPENDENT paths, after checking that
    both have them."""
    for path in TIME_DEPENDENT:
        mine, theirs, keyword = ours, reference, path
        if "." in path:  # "ContributingEquipmentSequence[-1].ContributionDateTime"
            sequence, keyword = path.split(".")
            sequence = sequence.removesuffix("[-1]")
            mine, theirs = ours[sequence].value[-1], reference[sequence].value[-1]
        assert keyword in mine and keyword in theirs, path
        mine[keyword].value = theirs[keyword].value


@pytest.mark.parametrize("case", sr_cases(), ids=lambda case: case.name)
def test_sr_equals_highdicoms_constructor(case):
    """build_sr assembles the document itself: every tag, VR and value, nested sequences
    included, is what highdicom's ComprehensiveSR constructor makes of the same content tree
    (tests/sr_reference.py), but for the time-dependent ones (TIME_DEPENDENT: Content and
    Instance Creation Date/Time, the highdicom item's ContributionDateTime; no UID is
    generated fresh). The files are then byte for byte equal, and highdicom reads ours."""
    args = (case.evidence, case.previous, case.instance_number)
    ours = build_sr(case.report, *args)
    assert type(ours) is pydicom.Dataset
    by_sop = {ds.SOPInstanceUID: ds for ds in case.evidence}
    reference = highdicom_sr(case.report, content_tree(case.report, by_sop), *args)
    assert list(differences(ours, reference)) == []
    _stamp(ours, reference)
    raw = sr_bytes(ours)
    assert raw == sr_bytes(reference)
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw))
    # as read back: the file meta's group length is the one written, DA/TM/DT values are str
    assert list(differences(back, ours, file_meta=False, types=False)) == []
    assert back.file_meta.MediaStorageSOPInstanceUID == ours.SOPInstanceUID
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(raw))
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    parsed = hd.sr.ComprehensiveSR.from_dataset(back)
    assert parsed.content[0].ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121049"
    assert [e[2] for e in parsed.get_evidence()] == list(dict.fromkeys(by_sop))


def test_sr_comparison_sees_a_changed_value_tag_or_vr(ct):
    """The comparison of test_sr_equals_highdicoms_constructor can fail: a nested value, a
    missing tag and a VR are each reported."""
    case = sr_cases()[0]
    ours = build_sr(case.report, case.evidence)
    reference = highdicom_sr(
        case.report, content_tree(case.report, {ct.SOPInstanceUID: ct}), case.evidence
    )
    assert list(differences(ours, reference)) == []
    ours.ContentSequence[-1].ContentSequence[0].TextValue = "changed"
    del ours.AccessionNumber
    ours.ContentSequence[0].add_new("ConceptNameCodeSequence", "SQ", [])
    reference.SeriesNumber = 991
    found = list(differences(ours, reference))
    assert any("TextValue: 'changed'" in d for d in found), found
    assert "AccessionNumber: in one only" in found
    assert "SeriesNumber: '990' != '991'" in found or any("SeriesNumber" in d for d in found)
    assert len(found) >= 4, found


def test_fhir_diagnostic_report_round_trips_as_r4(ct):
    report = _report(ct)
    devices = {r.model: device_uid(r.model, r.model_id) for r in report.readings}
    resource = build_fhir(report, devices, "PID-7", "1.2.3.4")
    back = DiagnosticReport.model_validate_json(fhir_json(resource))
    assert back.status == "preliminary" and back.subject.identifier.value == "PID-7"
    assert back.imagingStudy[0].identifier.value == f"urn:oid:{ct.StudyInstanceUID}"
    assert back.identifier[0].value == "urn:oid:1.2.3.4"
    assert back.conclusionCode[0].coding[0].display == "Abnormal"
    contained = {c.id: c for c in back.contained}
    assert contained["device-0"].deviceName[0].name == "gpt-4o"
    assert contained["device-1"].modelNumber == "claude-sonnet-4-6"
    assert contained["reading-1"].device.reference == "#device-1"
    finding = contained["finding-0"]
    assert finding.valueString == "Nodule in the right upper lobe"
    assert [r.reference for r in finding.derivedFrom] == ["#reading-0"]
    consensus = contained["consensus"]
    review = next(c for c in consensus.component if c.code.coding[0].code == "needs-review")
    assert review.valueBoolean is True
    # every contained resource is referenced (FHIR dom-3)
    text = fhir_json(resource).decode()
    assert all(f'"#{cid}"' in text for cid in contained)


def test_fhir_is_built_typed_and_a_bad_value_fails_where_it_is_made(ct):
    """Each contained resource is an R4B model when it is made: an empty model id (FHIR
    strings are never empty) fails as the Device's modelNumber, not as the report's."""
    report = _report(ct)
    devices = {r.model: device_uid(r.model, r.model_id) for r in report.readings}
    resource = build_fhir(report, devices)
    kinds = [type(c).__name__ for c in resource.contained]
    assert kinds[:4] == ["Device", "Observation", "Device", "Observation"]
    assert {type(c).__module__.split(".")[-2] for c in resource.contained} == {"R4B"}
    bad = report.model_copy(
        update={"readings": [report.readings[0].model_copy(update={"model_id": ""})]}
    )
    with pytest.raises(ValidationError, match=r"1 validation error for Device\nmodelNumber"):
        build_fhir(bad, devices)


def test_write_report_writes_four_files_review_pointer_and_json_last(ct, tmp_path):
    store = LocalStore(tmp_path)
    report = _report(ct)
    write_report(store, report, {"ab" * 32: b"\x89PNG fake"}, [evidence_dataset(ct, "ct.dcm")])
    folder = tmp_path / "studies" / ct.StudyInstanceUID
    names = {"report.json", "report.md", "report.sr.dcm", "report.fhir.json"}
    assert names <= {p.name for p in folder.iterdir()}
    last = max(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert last.name == "report.json"
    saved = json.loads((folder / "report.json").read_text())
    jsonschema.validate(saved, json.loads(SCHEMA_FILE.read_text()))
    assert "report.sr.dcm" in saved["outputs"] and "report.fhir.json" in saved["outputs"]
    pointer = json.loads((tmp_path / "review" / f"{ct.StudyInstanceUID}.json").read_text())
    assert pointer["needs_review"] is True and pointer["reasons"] == ["models disagree on abnormal"]
    # agreeing readings on a rerun: no review, and the old pointer says so
    write_report(store, _report(ct, disagree=False), {}, [evidence_dataset(ct, "ct.dcm")])
    pointer = json.loads((tmp_path / "review" / f"{ct.StudyInstanceUID}.json").read_text())
    assert pointer["needs_review"] is False


def test_run_review_table_lists_the_queue_most_urgent_first(ct, tmp_path):
    summary = RunSummary(
        run_id="r1", source="s", dest="d", reported=3, started_at="2026-01-01T00:00:00Z"
    )
    normal = _report(ct)
    urgent = _report(ct).model_copy(update={"study_instance_uid": "9.9"})
    urgent.consensus = urgent.consensus.model_copy(update={"urgency": Urgency.IMMEDIATE})
    summary.review_queue = [review_entry(normal), review_entry(urgent)]
    table = render_review_table(summary)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "study" not in line]
    assert rows[0].startswith("| 9.9 | abnormal | immediate") and len(rows) == 2
    write_run_summary(LocalStore(tmp_path), summary)
    assert (tmp_path / "runs" / "r1.review.md").read_text() == table
    saved = RunSummary.model_validate_json((tmp_path / "runs" / "r1.json").read_text())
    assert [e.study_instance_uid for e in saved.review_queue] == [ct.StudyInstanceUID, "9.9"]


# ---- end to end: the screening flow on a real Prefect API and the simulator over HTTP ----


def _check_four_files(dest: Path) -> dict[str, Report]:
    schema = json.loads(SCHEMA_FILE.read_text())
    reports = {}
    for folder in sorted((dest / "studies").iterdir()):
        data = json.loads((folder / "report.json").read_text())
        jsonschema.validate(data, schema)
        report = Report.model_validate(data)
        assert (folder / "report.md").read_text().startswith("# ")
        sr = hd.sr.srread(folder / "report.sr.dcm")
        assert sr.StudyInstanceUID == report.study_instance_uid
        referenced = {
            s.ReferencedSOPInstanceUID
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for series in e.ReferencedSeriesSequence
            for s in series.ReferencedSOPSequence
        }
        assert referenced == {i.sop_instance_uid for i in report.images}
        fhir = DiagnosticReport.model_validate_json((folder / "report.fhir.json").read_bytes())
        assert fhir.status == "preliminary"
        assert fhir.imagingStudy[0].identifier.value == f"urn:oid:{report.study_instance_uid}"
        assert fhir.identifier[0].value == f"urn:oid:{sr.SOPInstanceUID}"
        reports[folder.name] = report
    return reports


@pytest.mark.e2e
def test_disagreeing_panel_flags_every_study_with_an_impression(prefect_harness, samples, tmp_path):
    # gpt-4o always says abnormal (sensitivity 1, specificity 0), claude never does
    with running_simulator(
        "--profile", "gpt-4o=1,0", "--profile", "claude-sonnet-4-6=0,1", "--record-bodies"
    ) as sim:
        config = sim_config(sim, tmp_path, language="en", synthesis={"model": "gpt-4o"})
        dest = tmp_path / "out"
        summary = asyncio.run(screen(str(samples), str(dest), str(config)))
        bodies = sim.bodies()["gpt-4o"]
    reports = _check_four_files(dest)
    assert len(reports) == 8 == summary.reported == summary.needs_review
    for uid, report in reports.items():
        c = report.consensus
        assert c.needs_review and "models disagree on abnormal" in c.review_reasons
        assert c.abnormal is True and c.score == 0.5 and c.agreement == 0.5  # tie → abnormal
        assert (dest / "review" / f"{uid}.json").is_file()
        imp = report.impression
        assert imp and imp.ok and imp.model_written and imp.simulated and imp.model == "gpt-4o"
        assert "SIMULATED impression" in imp.text and "2 structured reading" in imp.text
        md = (dest / "studies" / uid / "report.md").read_text()
        assert "## Impression" in md and "Written by the model gpt-4o" in md
        p = report.provenance
        assert p.consensus_rule == c.rule and p.synthesis_prompt_version.startswith("impression-v1")
        assert p.image_sha256 == [i.sha256 for i in report.images]
        assert {m.endpoint_host for m in p.models} == {"127.0.0.1"}
    # the synthesis requests carry no image and no clinical context
    synthesis = [b for b in bodies if "image_url" not in b]
    assert len(synthesis) == 8
    assert all("Clinical context" not in b and "age_band" not in b for b in synthesis)
    assert summary.model_calls == 8 * 3 and summary.fleiss_kappa is not None
    assert summary.fleiss_kappa < 0 and summary.kappa_studies == 8  # systematic disagreement
    assert len(summary.review_queue) == 8
    table = (dest / "runs" / f"{summary.run_id}.review.md").read_text()
    assert all(uid in table for uid in reports)


@pytest.mark.e2e
def test_agreeing_normal_panel_needs_no_review_and_writes_korean(
    prefect_harness, samples, tmp_path
):
    with running_simulator("--profile", "*=0,1") as sim:  # every model always says normal
        config = sim_config(sim, tmp_path, language="ko", synthesis={"model": "claude"})
        dest = tmp_path / "out"
        summary = asyncio.run(screen(str(samples), str(dest), str(config), limit=4))
    reports = _check_four_files(dest)
    assert len(reports) == 4 and summary.needs_review == 0 and summary.review_queue == []
    assert not (dest / "review").exists()
    assert not list((dest / "runs").glob("*.review.md"))
    assert summary.fleiss_kappa is None and summary.kappa_studies == 4  # one category only
    for uid, report in reports.items():
        c = report.consensus
        assert (c.abnormal, c.urgency, c.needs_review, c.agreement) == (
            False,
            Urgency.NORMAL,
            False,
            1.0,
        )
        assert report.impression.ok and "시뮬레이션 인상" in report.impression.text
        md = (dest / "studies" / uid / "report.md").read_text()
        assert "## 인상" in md and "검토 필요: 아니오" in md
        sr = pydicom.dcmread(dest / "studies" / uid / "report.sr.dcm")
        language = sr.ContentSequence[0].ConceptCodeSequence[0].CodeValue
        assert language == "ko-KR"


@pytest.mark.e2e
def test_synthesis_shares_the_panel_client_its_limit_and_the_request_count(
    prefect_harness, samples, tmp_path
):
    import yaml

    # one call at a time per model; with the latency, a synthesis call outside the model's
    # limit would overlap the next study's reading
    with running_simulator("--latency", "0.2") as sim:
        config = tmp_path / "radflow.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "language": "en",
                    "models": panel_config(sim.url, KEY_ENV, max_concurrency=1),
                    "synthesis": {"model": "gpt-4o"},
                }
            )
        )
        summary = asyncio.run(screen(str(samples), str(tmp_path / "out"), str(config), limit=5))
        stats = sim.stats()
    reports = read_reports(tmp_path / "out")
    assert summary.reported == len(reports) == 5
    assert all(r.impression.ok and r.impression.requests == 1 for r in reports.values())
    # readings and impressions took turns in gpt-4o's one slot
    assert stats["peak_in_flight"] == {"gpt-4o": 1, "claude-sonnet-4-6": 1}
    assert stats["requests"] == {"gpt-4o": 10, "claude-sonnet-4-6": 5}
    # the run summary counts every request the server saw, the impressions' too
    assert (
        summary.requests
        == 15
        == sum(
            sum(x.requests for x in r.readings) + r.impression.requests for r in reports.values()
        )
    )
    # one SDK client per model for the whole run: its one connection served every call
    assert stats["connections"] == {"gpt-4o": 1, "claude-sonnet-4-6": 1}


def test_synthesis_model_must_be_a_panel_model(tmp_path):
    from tasks.core.config import load_settings
    from tasks.core.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(
        "models: [{name: a, provider: openai, model: m, api_key_env: K}]\nsynthesis: {model: b}\n"
    )
    with pytest.raises(ConfigError, match='synthesis.model "b" is not a panel model'):
        load_settings(path)


def _synthesize(settings, model: str, report: Report) -> Impression:
    """The impression by ``model``, with the client of a panel made for the call."""
    from tasks.models.panel import Panel
    from tasks.models.synthesis import synthesize

    async def run() -> Impression:
        panel = Panel(settings)
        try:
            return await synthesize(
                panel.client(model),
                SynthesisConfig(model=model),
                settings.language,
                report.consensus,
                report.readings,
            )
        finally:
            await panel.aclose()

    return asyncio.run(run())


@pytest.mark.e2e
def test_synthesis_writes_from_structured_readings_and_fails_softly(simulator, ct, tmp_path):
    from tasks.core.config import load_settings
    from tasks.models.synthesis import synthesis_input

    report = _report(ct)
    text = synthesis_input(report.consensus, report.readings)
    assert json.loads(text)["consensus"]["abnormal"] is True
    assert ct.StudyInstanceUID not in text and "rationale" not in text

    settings = load_settings(sim_config(simulator, tmp_path, language="en"))
    for model in ("gpt-4o", "claude"):  # both wire protocols
        imp = _synthesize(settings, model, report)
        assert imp.ok and imp.model == model and imp.simulated and imp.model_written
        assert imp.text.startswith("SIMULATED impression") and imp.output_tokens > 0
        assert imp.cost_usd > 0 and imp.endpoint_host == "127.0.0.1" and imp.requests == 1
        assert imp.prompt_version.startswith("impression-v1-") and imp.language == "en"
    broken = settings.model_copy(deep=True)
    broken.models[0].base_url = "http://127.0.0.1:9/v1"
    broken.models[0].max_retries = 1
    imp = _synthesize(broken, "gpt-4o", report)
    assert not imp.ok and "APIConnectionError" in imp.error and imp.text == ""
    assert imp.requests == 2  # the first attempt and the SDK's one retry
    md = render_markdown(_report(ct, impression=imp))
    assert "The impression could not be written (gpt-4o: APIConnectionError" in md
