"""Screen one study: key images → panel readings → consensus → report. This is the coarse
Prefect task of the screening flow (one task run per study; model calls are plain async calls
inside it, see DESIGN.md for why)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks
from tasks.config import PreprocessConfig, Settings
from tasks.consensus import build_consensus
from tasks.context import clinical_context
from tasks.diagnose import Panel, Prompt
from tasks.discover import Instance, Study
from tasks.errors import RadflowError
from tasks.preprocess import PreparedImage, prepare
from tasks.reliability import model_weights
from tasks.report import write_error, write_report
from tasks.schema import ErrorRecord, ImageInfo, Report
from tasks.storage import Store

__all__ = ["StudyOutcome", "key_instances", "prepare_study", "screen_study"]


@dataclass
class StudyOutcome:
    """What the flow needs to know about a screened study (the report itself is in DEST)."""

    study_instance_uid: str
    report: Report | None
    errors: list[ErrorRecord] = field(default_factory=list)


def key_instances(study: Study) -> list[list[Instance]]:
    """Per series, its instances ordered middle-out: the first that renders is the key image."""
    out = []
    for instances in study.series.values():
        mid = (len(instances) - 1) // 2
        out.append(sorted(instances, key=lambda i: abs(instances.index(i) - mid)))
    return out


def prepare_study(
    store: Store, study: Study, config: PreprocessConfig
) -> tuple[list[tuple[Instance, PreparedImage]], list[ErrorRecord]]:
    """Render one key image per series (up to ``config.max_images_per_study``); an instance
    that fails becomes an error record and the next one of its series is tried."""
    images: list[tuple[Instance, PreparedImage]] = []
    errors: list[ErrorRecord] = []
    for candidates in key_instances(study):
        if len(images) >= config.max_images_per_study:
            break
        for inst in candidates:
            try:
                with store.open_read(inst.ref.key) as fh:
                    images.append((inst, prepare(fh, config, name=inst.ref.uri)))
                break
            except RadflowError as exc:
                errors.append(
                    ErrorRecord(
                        source=inst.ref.uri,
                        reason=str(exc),
                        kind=exc.kind,
                        stage="preprocess",
                        study_instance_uid=study.study_instance_uid,
                    )
                )
    return images, errors


@task(
    name="screen-study",
    task_run_name="study-{study.study_instance_uid}",
    retries=2,
    retry_delay_seconds=[5, 30],
    timeout_seconds=1800,
    cache_policy=NO_CACHE,
    tags=["radflow-study"],
)
async def screen_study(
    study: Study, source: Store, dest: Store, settings: Settings, panel: Panel, prompt: Prompt
) -> StudyOutcome:
    """Preprocess, read with every model, combine, and write the study's report."""
    logger = get_run_logger()
    uid = study.study_instance_uid
    prepared, errors = await asyncio.to_thread(prepare_study, source, study, settings.preprocess)
    for record in errors:
        write_error(dest, record)
    failed = {e.source for e in errors}
    if not prepared:
        logger.warning("study %s: no instance could be rendered, no report", uid)
        return StudyOutcome(uid, None, errors)
    context = clinical_context(i.header for i in study.instances)
    readings = await panel.read([img.png for _, img in prepared], context, prompt)
    weights, weights_source = await asyncio.to_thread(model_weights, settings)
    consensus = build_consensus(readings, weights, settings.review, weights_source=weights_source)
    report = Report(
        study_instance_uid=uid,
        status="complete" if all(r.ok for r in readings) else "degraded",
        language=settings.language.value,
        consensus=consensus,
        readings=readings,
        images=[
            ImageInfo(
                sop_instance_uid=inst.sop_instance_uid,
                series_instance_uid=inst.series_instance_uid,
                source=inst.ref.uri,
                sha256=img.sha256,
                width=img.width,
                height=img.height,
                window=img.window,
                frame=img.frame,
                modality=inst.modality or None,
            )
            for inst, img in prepared
        ],
        sources=[i.ref.uri for i in study.instances if i.ref.uri not in failed],
        context=context,
        inputs_fingerprint=study.fingerprint,
        prompt_version=prompt.version,
        cost_usd=round(sum(r.cost_usd for r in readings), 6),
        simulated=any(r.simulated for r in readings),
        radflow_version=tasks.__version__,
    )
    await asyncio.to_thread(
        write_report, dest, report, {img.sha256: img.png for _, img in prepared}
    )
    logger.info(
        "study %s: %s, urgency %s, agreement %.2f%s",
        uid,
        {True: "abnormal", False: "normal", None: "no reading"}[consensus.abnormal],
        consensus.urgency.value if consensus.urgency else "-",
        consensus.agreement,
        ", needs review" if consensus.needs_review else "",
    )
    return StudyOutcome(uid, report, errors)
