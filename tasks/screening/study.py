"""Screen one study: key images → panel readings → consensus → report (the ``screen-studies``
task of tasks/screening/batches.py runs it for each study of its batch)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from importlib import import_module
from typing import TYPE_CHECKING

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

import tasks
from tasks.consensus.reliability import model_weights
from tasks.consensus.vote import build_consensus
from tasks.core.config import Settings
from tasks.core.errors import SymlinkEscape
from tasks.core.privacy import LogNames, log_names
from tasks.core.schema import ImageInfo, ModelProvenance, Provenance, Report
from tasks.imaging.budget import DecodeBudget, decode_budget, decode_claim
from tasks.imaging.studyimages import prepare_study
from tasks.ingest.context import deidentify, vocabularies
from tasks.ingest.discover import Study
from tasks.models.cache import ReadingCache
from tasks.pacs.publish import PublishTarget, publish_target
from tasks.reports.write import publish_report, reported, study_errors, write_error, write_errors
from tasks.screening.claims import Claim, Lease, kept, take
from tasks.screening.pool import off_loop
from tasks.screening.summary import StudyOutcome, study_cost
from tasks.storage import Store

if TYPE_CHECKING:
    from tasks.models.panel import Panel, Prompt

__all__ = ["MODELS_MODULE", "Screening", "read_study", "screen_study"]

# The panel and both model SDKs: imported when a run starts reading (Screening.start), not
# with this module, so that `radflow screen` can import them in a thread while Prefect
# starts the flow run (flows/screen_cli.py); ~1.5-2 s of a new process's start-up.
MODELS_MODULE = "tasks.models.panel"


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
    names: LogNames  # how logs and artifacts name studies (settings.privacy)
    decoding: DecodeBudget  # decoding memory of this process (settings.runner.decode_memory_mib)
    run_id: str  # names the run in its claims and reports
    since: datetime | None  # with --force: only reports from then on count as done
    publish: PublishTarget | None = None  # where SRs go by STOW-RS (``publish``)

    @classmethod
    async def start(
        cls,
        source: Store,
        dest: Store,
        settings: Settings,
        names: LogNames | None = None,
        run_id: str | None = None,
        since: datetime | None = None,
    ) -> Screening:
        """The run-wide parts: the panel (its reading cache in DEST), the prompt, the vote
        weights (read once: a reliability.json may be on S3), the window, the log names
        (DEST's pseudonym key, unless given), the context vocabularies (loaded here, off
        the event loop) and the decoding budget."""
        if names is None:
            names = await asyncio.to_thread(log_names, dest, settings.privacy)
        await asyncio.to_thread(vocabularies)
        models = await asyncio.to_thread(import_module, MODELS_MODULE)
        Panel, load_prompt = models.Panel, models.load_prompt  # noqa: N806 (a class)
        return cls(
            source=source,
            dest=dest,
            settings=settings,
            panel=Panel(settings, cache=ReadingCache(dest)),
            prompt=load_prompt(settings.language),
            weights=await asyncio.to_thread(model_weights, settings),
            window=asyncio.Semaphore(settings.max_studies_in_flight),
            names=names,
            decoding=decode_budget(settings.runner),
            run_id=run_id or f"local-{uuid.uuid4().hex[:12]}",
            since=since,
            publish=publish_target(settings, source.uri),
        )


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (the lines show in the UI), or this module's outside Prefect."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


async def screen_study(study: Study, run: Screening) -> StudyOutcome:
    """Claim the study in DEST, then read it (:func:`read_study`) unless another run has
    reported it meanwhile; a study that another live run holds is left to it."""
    uid = study.study_instance_uid
    log_id = run.names.study(uid)
    lease = run.settings.claim_lease_seconds
    claim = await asyncio.to_thread(take, run.dest, uid, run.run_id, lease, log_id)
    if isinstance(claim, Lease):
        _logger().info("study %s: %s; left to it", log_id, claim.describe())
        return StudyOutcome(uid, None, log_id=log_id, elsewhere=claim.describe())
    async with kept(claim):
        try:
            done = await asyncio.to_thread(reported, run.dest, uid, study.fingerprint, run.since)
        except SymlinkEscape as exc:  # its folder leads out of DEST: refused before any call
            _logger().warning("study %s: its DEST folder is a symlink out of DEST", log_id)
            records = study_errors(study, str(exc), exc.kind, "report")
            await asyncio.to_thread(write_errors, run.dest, records)
            return StudyOutcome(uid, None, records, log_id)
        if done is not None:
            why = f"reported meanwhile by run {done.get('run_id') or '?'}"
            _logger().info("study %s: %s", log_id, why)
            return StudyOutcome(uid, None, log_id=log_id, elsewhere=why)
        return await read_study(study, run, claim)


async def read_study(study: Study, run: Screening, claim: Claim) -> StudyOutcome:
    """Preprocess, read with every model, combine, and write the study's report, if
    ``claim`` is still held when it is written."""
    source, dest, settings, panel, prompt = (
        run.source,
        run.dest,
        run.settings,
        run.panel,
        run.prompt,
    )
    logger = _logger()
    uid = study.study_instance_uid
    log_id = run.names.study(uid)
    cpu = partial(off_loop, settings.runner, settings.storage)  # threads or the process pool
    # decoding waits for its claim on the process's budget, in threads and pool alike
    async with run.decoding.hold(decode_claim(study, settings.preprocess)):
        prepared, errors = await cpu(
            prepare_study, [source], study, settings.preprocess, panel.providers
        )
    for record in errors:
        write_error(dest, record)
    failed = {e.source for e in errors}
    if not prepared:
        logger.warning("study %s: no instance could be rendered, no report", log_id)
        return StudyOutcome(uid, None, errors, log_id)
    context = deidentify(i.header for i in study.instances)
    if unknown := {f: n["unknown"] for f, n in context.dropped.items() if n["unknown"]}:
        logger.warning(
            "study %s: context values outside the vocabulary not sent: %s",
            log_id,
            ", ".join(f"{f} {n}" for f, n in unknown.items()),
        )
    sized = {p: [img.for_provider(p) for _, img in prepared] for p in panel.providers}
    readings = await panel.read(sized, context.values, prompt)
    weights, weights_source = run.weights
    consensus = build_consensus(readings, weights, settings.review, weights_source=weights_source)
    impression = None
    if settings.synthesis is not None:
        from tasks.models.synthesis import synthesize  # imported with the panel already

        impression = await synthesize(  # with the panel's client of that model
            panel.client(settings.synthesis.model),
            settings.synthesis,
            settings.language,
            consensus,
            readings,
        )
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
                burned_in=img.burned_in,
            )
            for inst, img in prepared
        ],
        sources=[ref.uri for ref in study.objects if ref.uri not in failed],
        context=context.values,
        context_dropped=context.dropped,
        log_id=log_id,
        inputs_fingerprint=study.fingerprint,
        fetched_bytes=sum(img.source_bytes for _, img in prepared),
        prompt_version=prompt.version,
        cost_usd=study_cost(readings, impression),
        simulated=any(r.simulated for r in readings),
        radflow_version=tasks.__version__,
        run_id=run.run_id,
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
            synthesis_prompt_version=impression.prompt_version if impression else None,
        ),
    )
    evidence = [(inst.ref.key, inst.ref.uri) for inst, _ in prepared]
    pngs = {img.sha256: img.png for _, img in prepared}
    if not await asyncio.to_thread(claim.held):
        logger.warning("study %s: lost its claim while read (%s), no report", log_id, claim.lost)
        return StudyOutcome(uid, None, errors, log_id, elsewhere=claim.lost)
    # in a pool process, never in this one's threads: the SR holds the GIL (off_loop)
    written, report.published = await cpu(
        publish_report, [source, dest], report, pngs, evidence, run.publish, queue=True
    )
    errors += written
    logger.info(
        "study %s: %s, urgency %s, agreement %.2f%s",
        log_id,
        {True: "abnormal", False: "normal", None: "no reading"}[consensus.abnormal],
        consensus.urgency.value if consensus.urgency else "-",
        consensus.agreement,
        ", needs review" if consensus.needs_review else "",
    )
    return StudyOutcome(uid, report, errors, log_id)
