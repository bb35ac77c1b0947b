"""report.fhir.json: the consensus as a FHIR R4 DiagnosticReport with contained Device (one per
AI model) and Observation resources, status preliminary, each built from fhir.resources' typed
R4B models as it goes (a bad value fails where it is made, naming the element)."""

from __future__ import annotations

import hashlib
import logging

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from tasks.core.config import Language
from tasks.core.schema import ModelReading, Report
from tasks.core.words import ABNORMAL_CODES, LANGUAGE_TAGS, SNOMED_CT, result

__all__ = ["FHIR_VERSION", "RADFLOW_SYSTEM", "build_fhir", "fhir_json"]

logger = logging.getLogger(__name__)

# fhir.resources' default models are R5; R4B (4.3.0) is wire-compatible with R4 for
# DiagnosticReport, Observation and Device as used here.
FHIR_VERSION = "4.3.0"
RADFLOW_SYSTEM = "urn:radflow:codes"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"  # diagnostic service section


def _coded(system: str, code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)])


def _code(code: str, display: str) -> CodeableConcept:
    """A radflow code (``urn:radflow:codes``)."""
    return _coded(RADFLOW_SYSTEM, code, display)


def _abnormal(abnormal: bool) -> CodeableConcept:
    """SNOMED CT Abnormal / Normal."""
    return _coded(SNOMED_CT, *ABNORMAL_CODES[abnormal])


def _ratio(value: float) -> Quantity:
    return Quantity(value=value, unit="1", system=UCUM, code="1")


def _dicom_uid(uid: str) -> Identifier:
    return Identifier(system=DICOM_UID, value=f"urn:oid:{uid}")


def _notes(texts: list[str]) -> list[Annotation] | None:
    return [Annotation(text=t) for t in texts] or None


def _urgency(urgency: object) -> ObservationComponent:
    value = str(getattr(urgency, "value", urgency))
    return ObservationComponent(
        code=_code("urgency", "Urgency"), valueCodeableConcept=_code(value, value)
    )


def _reading_observation(i: int, r: ModelReading) -> Observation:
    found = r.ok and r.abnormal is not None
    notes = [*r.findings, *(f"differential: {d}" for d in r.differentials)] if found else []
    return Observation(
        id=f"reading-{i}",
        status="preliminary",
        code=_code("model-reading", f"AI model reading ({r.model})"),
        device=Reference(reference=f"#device-{i}", display=r.model),
        valueCodeableConcept=_abnormal(bool(r.abnormal)) if found else None,
        component=[_urgency(r.urgency)] if found and r.urgency is not None else None,
        dataAbsentReason=None if found else _coded(DATA_ABSENT, "error", "Error"),
        note=_notes(notes if found else [r.error or "no reading"]),
    )


def _device(i: int, r: ModelReading, device_uid: str) -> Device:
    return Device(
        id=f"device-{i}",
        identifier=[_dicom_uid(device_uid)],
        deviceName=[DeviceDeviceName(name=r.model, type="user-friendly-name")],
        manufacturer=r.provider,
        modelNumber=r.model_id,
        version=[DeviceVersion(value=r.response_model)] if r.response_model else None,
    )


def _consensus(report: Report, derived: list[Reference]) -> Observation:
    """Abnormal, urgency, agreement, score and review flag of the panel."""
    c = report.consensus
    components = [
        ObservationComponent(
            code=_code("agreement", "Panel agreement"), valueQuantity=_ratio(c.agreement)
        ),
        ObservationComponent(
            code=_code("needs-review", "Needs review"), valueBoolean=c.needs_review
        ),
    ]
    if c.urgency is not None:
        components.append(_urgency(c.urgency))
    if c.score is not None:
        components.append(
            ObservationComponent(
                code=_code("score", "Weighted abnormal vote share"), valueQuantity=_ratio(c.score)
            )
        )
    return Observation(
        id="consensus",
        status="preliminary",
        code=_code("consensus", "Panel consensus on abnormality"),
        method=CodeableConcept(text=f"{c.rule}; weights from {c.weights_source}"),
        component=components,
        note=_notes([f"review: {reason}" for reason in c.review_reasons]),
        derivedFrom=derived or None,
        dataAbsentReason=(
            CodeableConcept(text="no model produced a reading") if c.abnormal is None else None
        ),
        valueCodeableConcept=_abnormal(c.abnormal) if c.abnormal is not None else None,
    )


def _conclusion(report: Report) -> str:
    imp, c = report.impression, report.consensus
    if imp is not None and imp.ok:
        return f"[model-written by {imp.model} ({imp.model_id})] {imp.text}"
    urgency = c.urgency.value if c.urgency else "unknown"
    return (
        f"AI panel consensus: {result(c.abnormal)}; urgency {urgency}; agreement {c.agreement:.0%}"
    )


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
    contained: list[Device | Observation] = []
    reading_refs: dict[str, str] = {}
    for i, r in enumerate(report.readings):
        contained += [_device(i, r, device_uids[r.model]), _reading_observation(i, r)]
        reading_refs[r.model] = f"#reading-{i}"
    ok = [Reference(reference=reading_refs[r.model]) for r in report.readings if r.ok]
    contained.append(_consensus(report, ok))
    for k, finding in enumerate(c.findings):
        refs = [Reference(reference=reading_refs[m]) for m in finding.models if m in reading_refs]
        contained.append(
            Observation(
                id=f"finding-{k}",
                status="preliminary",
                code=_coded(LOINC, "59776-5", "Findings"),
                valueString=finding.text,
                derivedFrom=refs or None,
                note=[Annotation(text=f"supported by {', '.join(finding.models)}")],
            )
        )
    tags = [Coding(system=RADFLOW_SYSTEM, code="ai-generated", display="AI-generated")]
    if report.simulated:
        tags.append(Coding(system=RADFLOW_SYSTEM, code="simulated", display="Simulated"))
    key = f"{report.study_instance_uid}\0{report.created_at}".encode()
    return DiagnosticReport(
        id=hashlib.sha256(key).hexdigest()[:32],
        meta=Meta(tag=tags),
        language=LANGUAGE_TAGS[Language(report.language)][0],
        contained=contained,
        status="preliminary",
        category=[_coded(V2_0074, "RAD", "Radiology")],
        code=_coded(LOINC, "18748-4", "Diagnostic imaging study"),
        issued=report.created_at.isoformat(),
        imagingStudy=[Reference(identifier=_dicom_uid(report.study_instance_uid))],
        result=[Reference(reference=f"#{o.id}") for o in contained if isinstance(o, Observation)],
        conclusion=_conclusion(report),
        conclusionCode=[_abnormal(c.abnormal)] if c.abnormal is not None else None,
        subject=(
            Reference(identifier=Identifier(value=patient_id), type="Patient")
            if patient_id
            else None
        ),
        identifier=[_dicom_uid(sr_sop_instance_uid)] if sr_sop_instance_uid else None,
    )


def fhir_json(resource: DiagnosticReport) -> bytes:
    """The resource as FHIR JSON (fhir.resources' serialiser: no nulls, FHIR field order)."""
    return resource.model_dump_json(indent=2).encode()
