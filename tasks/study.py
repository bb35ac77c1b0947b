"""Screen one study: key images → panel readings → consensus → report; and the coarse Prefect
task of the screening flow, one task run per batch of studies (model calls are plain async
calls inside it, see DESIGN.md for why)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

import tasks
from tasks.cache import ReadingCache
from tasks.config import Settings
from tasks.consensus import build_consensus
from tasks.context import clinical_context
from tasks.diagnose import Panel, Prompt, load_prompt
from tasks.discover import Study
from tasks.errors import StudiesFailed
from tasks.pacs.publish import PublishTarget, publish_target
from tasks.reliability import model_weights
from tasks.report import publish_report, write_error
from tasks.runner import off_loop
from tasks.schema import ErrorRecord, ImageInfo, ModelProvenance, Provenance, Report
from tasks.storage import Store
from tasks.studyimages import prepare_study
from tasks.synthesis import impression_prompt, synthesize

__all__ = [
    "Batch",
    "Screening",
    "StudyOutcome",
    "screen_studies",
    "screen_study",
]


@dataclass
class StudyOutcome:
    """What the flow needs to know about a screened study (the report itself is in DEST)."""

    study_instance_uid: str
    report: Report | None
    errors: list[ErrorRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Screening:
    """What every study of a run shares, made once per run by the flow."""

    source: Store
    dest: Store
    settings: Settings
    panel: Panel
    prompt: Prompt
    weights: tuple[dict[str, float], str]  # vote weight per model, and where they come from
    window: asyncio.Semaphore  # studies in flight (settings.max_studies_in_flight)
    publish: PublishTarget | None = None  # where SRs go by STOW-RS (``publish``)

    @classmethod
    async def start(cls, source: Store, dest: Store, settings: Settings) -> Screening:
        """The run-wide parts: the panel (its reading cache in DEST), the prompt, the vote
        weights (read once: a reliability.json may be on S3), the window."""
        return cls(
            source=source,
            dest=dest,
            settings=settings,
            panel=Panel(settings, cache=ReadingCache(dest)),
            prompt=load_prompt(settings.language),
            weights=await asyncio.to_thread(model_weights, settings),
            window=asyncio.Semaphore(settings.max_studies_in_flight),
            publish=publish_target(settings, source.uri),
        )


@dataclass
class Batch:
    """Consecutive studies of a run, screened by one task run. ``done`` and ``failed`` (the
    last reason per study) outlive the task run's attempts: a retry skips what is done."""

    label: str
    studies: list[Study]
    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


@task(
    name="screen-studies",
    task_run_name="studies-{batch.label}",
    retries=2,
    retry_delay_seconds=[5, 30],
    timeout_seconds=1800,
    cache_policy=NO_CACHE,
    # no tags: a tagged task run asks the API for tag concurrency slots as it starts
)
async def screen_studies(
    batch: Batch, run: Screening, finished: Callable[[StudyOutcome], None]
) -> int:
    """Screen the studies of ``batch`` not done yet, each as soon as ``run.window`` has room,
    calling ``finished`` with each outcome as it comes. One task run per batch rather than
    per study: each task run costs the event loop and the Prefect API 10-40 ms (DESIGN.md).
    A study that raises fails the task run once the others have finished; Prefect's retries
    then screen the ones left."""
    todo = [s for s in batch.studies if s.study_instance_uid not in batch.done]

    async def one(study: Study) -> None:
        async with run.window:
            outcome = await screen_study(study, run)
        batch.done.add(study.study_instance_uid)
        batch.failed.pop(study.study_instance_uid, None)
        finished(outcome)

    results = await asyncio.gather(*(one(s) for s in todo), return_exceptions=True)
    for study, result in zip(todo, results, strict=True):
        if isinstance(result, BaseException):
            batch.failed[study.study_instance_uid] = f"{type(result).__name__}: {result}"
    if batch.failed:
        raise StudiesFailed(
            f"{len(batch.failed)} of {len(todo)} studies failed: "
            + "; ".join(f"{uid}: {reason}" for uid, reason in batch.failed.items())
        )
    return len(todo)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (the lines show in the UI), or this module's outside Prefect."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


async def screen_study(study: Study, run: Screening) -> StudyOutcome:
    """Preprocess, read with every model, combine, and write the study's report."""
    source, dest, settings, panel, prompt = (
        run.source,
        run.dest,
        run.settings,
        run.panel,
        run.prompt,
    )
    logger = _logger()
    uid = study.study_instance_uid
    cpu = partial(off_loop, settings.runner, settings.storage)  # threads or the process pool
    prepared, errors = await cpu(
        prepare_study, [source], study, settings.preprocess, panel.providers
    )
    for record in errors:
        write_error(dest, record)
    failed = {e.source for e in errors}
    if not prepared:
        logger.warning("study %s: no instance could be rendered, no report", uid)
        return StudyOutcome(uid, None, errors)
    context = clinical_context(i.header for i in study.instances)
    sized = {p: [img.for_provider(p) for _, img in prepared] for p in panel.providers}
    readings = await panel.read(sized, context, prompt)
    weights, weights_source = run.weights
    consensus = build_consensus(readings, weights, settings.review, weights_source=weights_source)
    impression = None
    if settings.synthesis is not None:
        impression = await synthesize(settings.synthesis, settings, consensus, readings)
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
        fetched_bytes=sum(img.source_bytes for _, img in prepared),
        prompt_version=prompt.version,
        cost_usd=round(
            sum(r.cost_usd for r in readings) + (impression.cost_usd if impression else 0), 6
        ),
        simulated=any(r.simulated for r in readings),
        radflow_version=tasks.__version__,
        impression=impression,
        provenance=Provenance(
            radflow_version=tasks.__version__,
            prompt_version=prompt.version,
            consensus_rule=consensus.rule,
            weights=consensus.weights,
            weights_source=consensus.weights_source,
            review_rules=settings.review.model_dump(),
            models=[
                ModelProvenance(
                    name=r.model,
                    provider=r.provider,
                    model_id=r.model_id,
                    endpoint_host=r.endpoint_host,
                    response_model=r.response_model,
                )
                for r in readings
            ],
            image_sha256=[img.sha256 for _, img in prepared],
            synthesis_prompt_version=(
                impression_prompt(settings.language)[1] if settings.synthesis else None
            ),
        ),
    )
    evidence = [(inst.ref.key, inst.ref.uri) for inst, _ in prepared]
    pngs = {img.sha256: img.png for _, img in prepared}
    written, report.published = await cpu(
        publish_report, [source, dest], report, pngs, evidence, run.publish
    )
    errors += written
    logger.info(
        "study %s: %s, urgency %s, agreement %.2f%s",
        uid,
        {True: "abnormal", False: "normal", None: "no reading"}[consensus.abnormal],
        consensus.urgency.value if consensus.urgency else "-",
        consensus.agreement,
        ", needs review" if consensus.needs_review else "",
    )
    return StudyOutcome(uid, report, errors)
