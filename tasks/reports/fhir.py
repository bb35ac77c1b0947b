"""report.fhir.json: the consensus as a FHIR R4 DiagnosticReport (fhir.resources, R4B models)
with contained Device (one per AI model) and Observation resources, status preliminary."""

from __future__ import annotations

import hashlib
import logging

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from tasks.core.schema import ModelReading, Report

__all__ = ["FHIR_VERSION", "RADFLOW_SYSTEM", "build_fhir", "fhir_json"]

logger = logging.getLogger(__name__)

# fhir.resources' default models are R5; R4B (4.3.0) is wire-compatible with R4 for
# DiagnosticReport, Observation and Device as used here.
FHIR_VERSION = "4.3.0"
RADFLOW_SYSTEM = "urn:radflow:codes"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
_ABNORMAL = {
    True: {"system": SCT, "code": "263654008", "display": "Abnormal"},
    False: {"system": SCT, "code": "17621005", "display": "Normal"},
}


def _code(code: str, display: str) -> dict:
    return {"coding": [{"system": RADFLOW_SYSTEM, "code": code, "display": display}]}


def _reading_observation(i: int, r: ModelReading) -> dict:
    obs: dict = {
        "resourceType": "Observation",
        "id": f"reading-{i}",
        "status": "preliminary",
        "code": _code("model-reading", f"AI model reading ({r.model})"),
        "device": {"reference": f"#device-{i}", "display": r.model},
    }
    if r.ok and r.abnormal is not None:
        obs["valueCodeableConcept"] = {"coding": [_ABNORMAL[r.abnormal]]}
        if r.urgency is not None:
            obs["component"] = [
                {
                    "code": _code("urgency", "Urgency"),
                    "valueCodeableConcept": _code(r.urgency.value, r.urgency.value),
                }
            ]
        notes = [*r.findings, *(f"differential: {d}" for d in r.differentials)]
        if notes:
            obs["note"] = [{"text": n} for n in notes]
    else:
        obs["dataAbsentReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "error",
                    "display": "Error",
                }
            ]
        }
        obs["note"] = [{"text": r.error or "no reading"}]
    return obs


def _device(i: int, r: ModelReading, device_uid: str) -> dict:
    device: dict = {
        "resourceType": "Device",
        "id": f"device-{i}",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{device_uid}"}],
        "deviceName": [{"name": r.model, "type": "user-friendly-name"}],
        "manufacturer": r.provider,
        "modelNumber": r.model_id,
    }
    if r.response_model:
        device["version"] = [{"value": r.response_model}]
    return device


def build_fhir(
    report: Report,
    device_uids: dict[str, str],
    patient_id: str | None = None,
    sr_sop_instance_uid: str | None = None,
) -> DiagnosticReport:
    """The DiagnosticReport: one contained Device and Observation per model reading, an
    Observation for the consensus (abnormal, urgency, agreement, score, review flag, derived
    from the model readings) and one per merged finding (derived from the readings that
    support it). ``imagingStudy`` and ``identifier`` point at the source study and the SR."""
    c = report.consensus
    contained: list[dict] = []
    reading_refs: dict[str, dict] = {}
    for i, r in enumerate(report.readings):
        contained.append(_device(i, r, device_uids[r.model]))
        contained.append(_reading_observation(i, r))
        reading_refs[r.model] = {"reference": f"#reading-{i}"}
    ok_refs = [reading_refs[r.model] for r in report.readings if r.ok]
    components: list[dict] = [
        {"code": _code("agreement", "Panel agreement"), "valueQuantity": _ratio(c.agreement)},
        {"code": _code("needs-review", "Needs review"), "valueBoolean": c.needs_review},
    ]
    if c.urgency is not None:
        components.append(
            {
                "code": _code("urgency", "Urgency"),
                "valueCodeableConcept": _code(c.urgency.value, c.urgency.value),
            }
        )
    if c.score is not None:
        components.append(
            {
                "code": _code("score", "Weighted abnormal vote share"),
                "valueQuantity": _ratio(c.score),
            }
        )
    consensus: dict = {
        "resourceType": "Observation",
        "id": "consensus",
        "status": "preliminary",
        "code": _code("consensus", "Panel consensus on abnormality"),
        "method": {"text": f"{c.rule}; weights from {c.weights_source}"},
        "component": components,
        "note": [{"text": f"review: {reason}"} for reason in c.review_reasons] or None,
    }
    if ok_refs:
        consensus["derivedFrom"] = ok_refs
    if c.abnormal is None:
        consensus["dataAbsentReason"] = {"text": "no model produced a reading"}
    else:
        consensus["valueCodeableConcept"] = {"coding": [_ABNORMAL[c.abnormal]]}
    contained.append(consensus)
    for k, finding in enumerate(c.findings):
        contained.append(
            {
                "resourceType": "Observation",
                "id": f"finding-{k}",
                "status": "preliminary",
                "code": {"coding": [{"system": LOINC, "code": "59776-5", "display": "Findings"}]},
                "valueString": finding.text,
                "derivedFrom": [reading_refs[m] for m in finding.models if m in reading_refs],
                "note": [{"text": f"supported by {', '.join(finding.models)}"}],
            }
        )
    imp = report.impression
    if imp is not None and imp.ok:
        conclusion = f"[model-written by {imp.model} ({imp.model_id})] {imp.text}"
    else:
        verdict = {None: "no reading", True: "abnormal", False: "no abnormality"}[c.abnormal]
        urgency = c.urgency.value if c.urgency else "unknown"
        conclusion = (
            f"AI panel consensus: {verdict}; urgency {urgency}; agreement {c.agreement:.0%}"
        )
    data: dict = {
        "resourceType": "DiagnosticReport",
        "id": hashlib.sha256(
            f"{report.study_instance_uid}\0{report.created_at}".encode()
        ).hexdigest()[:32],
        "meta": {
            "tag": [
                {"system": RADFLOW_SYSTEM, "code": "ai-generated", "display": "AI-generated"},
                *(
                    [{"system": RADFLOW_SYSTEM, "code": "simulated", "display": "Simulated"}]
                    if report.simulated
                    else []
                ),
            ]
        },
        "language": {"ko": "ko-KR", "en": "en-US"}[report.language],
        "contained": contained,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]
        },
        "issued": report.created_at.isoformat(),
        "imagingStudy": [
            {"identifier": {"system": DICOM_UID, "value": f"urn:oid:{report.study_instance_uid}"}}
        ],
        "result": [
            {"reference": f"#{o['id']}"} for o in contained if o["resourceType"] == "Observation"
        ],
        "conclusion": conclusion,
    }
    if c.abnormal is not None:
        data["conclusionCode"] = [{"coding": [_ABNORMAL[c.abnormal]]}]
    if patient_id:
        data["subject"] = {"identifier": {"value": patient_id}, "type": "Patient"}
    if sr_sop_instance_uid:
        data["identifier"] = [{"system": DICOM_UID, "value": f"urn:oid:{sr_sop_instance_uid}"}]
    return DiagnosticReport.model_validate(_drop_none(data))


def _ratio(value: float) -> dict:
    return {"value": value, "unit": "1", "system": UCUM, "code": "1"}


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def fhir_json(resource: DiagnosticReport) -> bytes:
    """The resource as FHIR JSON (fhir.resources' serialiser: no nulls, FHIR field order)."""
    return resource.model_dump_json(indent=2).encode()
