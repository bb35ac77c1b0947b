"""The screening flow: discover → (per study: preprocess → diagnose → consensus → report) → summary."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import partial
from importlib import import_module

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from flows.shards import run_shards
from tasks.consensus.vote import KAPPA_MODULE, panel_kappa
from tasks.core.config import load_settings
from tasks.core.errors import ConfigError, SymlinkEscape, retry_if_transient
from tasks.core.privacy import log_names, store_scheme
from tasks.core.schema import RunSummary
from tasks.ingest.discover import Inventory, Study, discover_studies
from tasks.ingest.events import SelectedObjects
from tasks.pacs.publish import PublishTarget, count_published, needs_publishing, publish_target
from tasks.reports.write import (
    reported,
    review_entry,
    study_errors,
    write_error,
    write_errors,
    write_run_summary,
)
from tasks.review.requests import request_reviews
from tasks.screening.monitor import RunMonitor, result_row, run_name, run_tags
from tasks.screening.pool import resolve_runner, warm
from tasks.screening.study import Batch, Screening, StudyOutcome, screen_studies
from tasks.storage import Store, open_store

__all__ = ["progress_hook", "screen"]

# The CLI sets this to drive its progress bar: called with (done, total, outcome or None).
progress_hook: ContextVar[Callable[[int, int, StudyOutcome | None], None] | None] = ContextVar(
    "radflow_progress_hook", default=None
)


discover = task(
    name="discover-studies",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_if_transient,  # a bad object is an error record, never a retry
    cache_policy=NO_CACHE,
)(discover_studies)


def _already_reported(dest: Store, study: Study, publish: PublishTarget | None = None) -> bool:
    """Reported from the same inputs (and, with ``publish``, its SR is on that server)."""
    try:
        previous = reported(dest, study.study_instance_uid, study.fingerprint)
    except SymlinkEscape:  # the study's folder leads out of DEST: screen_study records it
        return False
    return previous is not None and not needs_publishing(previous, publish)


def _first_run_name() -> str:
    """``screen-<date>-<store scheme>`` until discovery counts the studies (then
    ``screen-<date>-<n>-studies``): never the SOURCE path, which may name a patient."""
    scheme = store_scheme(flow_run.parameters.get("source"))
    return f"screen-{datetime.now(UTC):%Y-%m-%d}-{scheme}"


def _fail_unreported(dest: Store, study: Study, reason: str) -> int:
    """Error records for a study of a failed shard unless it was reported; how many."""
    if _already_reported(dest, study):
        return 0
    records = study_errors(study, reason)
    for record in records:
        write_error(dest, record)
    return len(records)


@flow(name="screen", flow_run_name=_first_run_name, log_prints=True)
async def screen(
    source: str | None = None,
    out: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    force: bool = False,
    keys: list[str] | None = None,
    reviews: bool | None = None,
) -> RunSummary:
    """Screen every study under ``source`` and write reports under ``out``.

    ``source``/``out`` default to the config's ``source``/``output`` (scheduled runs).
    ``keys`` (relative to ``source``) limits the run to those objects: an upload event's study.
    Studies already reported from the same inputs are skipped unless ``force``.
    ``reviews``: a review flow run per flagged study (None: the config's ``review.requests``).
    """
    logger = get_run_logger()
    started = datetime.now(UTC)
    settings = load_settings(config)
    source, out = source or settings.source, out or settings.output
    if not source or not out:
        raise ConfigError(
            "no SOURCE or DEST: pass them, or set `source` and `output` in the config"
        )
    publish = publish_target(settings, source)  # a bad target fails before any work
    src, dest = open_store(source, settings.storage), open_store(out, settings.storage)
    names = await asyncio.to_thread(log_names, dest, settings.privacy)
    if keys is not None:
        src = SelectedObjects(src, keys)
    inventory: Inventory = await asyncio.to_thread(discover, src, settings.storage.max_concurrency)
    discovery_bytes = getattr(src, "received", 0)  # a DICOMweb source: searches and metadata
    await asyncio.to_thread(write_errors, dest, inventory.errors, settings.storage.max_concurrency)
    if isinstance(src, SelectedObjects) and src.missing:
        listed = f": {src.missing}" if names.plain else " (names not logged)"
        logger.warning(
            "%d named objects are not under %s%s", len(src.missing), names.source(source), listed
        )
    studies = inventory.studies[:limit] if limit else inventory.studies
    pending = [s for s in studies if force or not _already_reported(dest, s, publish)]
    skipped = len(studies) - len(pending)
    logger.info("%d studies, %d to read, %d already reported", len(studies), len(pending), skipped)

    summary = RunSummary(
        run_id=str(flow_run.get_id() or started.strftime("%Y%m%dT%H%M%S")),
        source=source,
        dest=out,
        studies=len(studies),
        skipped=skipped,
        errors=len(inventory.errors),
        started_at=started,
        discovery_bytes=discovery_bytes,
    )
    hook = progress_hook.get()
    if hook:
        hook(0, len(pending), None)
    monitor = RunMonitor(flow_run.get_id(), names)
    labels = run_tags(names.source(source), [m.name for m in settings.models])
    await monitor.label(run_name(started, len(studies)), labels)
    await monitor.start(len(pending))
    warming: asyncio.Future | None = None
    rows: list[dict] = []
    votes: list[list[bool | None]] = []  # per study read: each model's abnormal (kappa)
    if settings.runner.shard_size and len(pending) > settings.runner.shard_size:
        summary.shards = await run_shards(  # child flow runs; see "Scaling out" in the README
            screen,
            pending,
            source=source,
            out=out,
            config=config,
            force=force,
            runner=settings.runner,
            dest=dest,
            summary=summary,
            progress=progress_hook,
            on_failure=partial(_fail_unreported, dest),
        )
    elif pending:
        # `preprocess: auto` → threads or the process pool, by the size of this run
        settings = settings.model_copy(
            update={"runner": resolve_runner(settings.runner, len(pending))}
        )
        # while the first models read: the pool's processes or highdicom's tables (for the
        # SRs), and statsmodels (for the kappa at the end); each takes a second or more
        loads = [warm(settings.runner)]
        if len(pending) > 1:
            loads.append(asyncio.to_thread(import_module, KAPPA_MODULE))
        warming = asyncio.ensure_future(asyncio.gather(*loads))
        # claims name the run; with --force, a report another run writes from now on is done
        run = await Screening.start(
            src, dest, settings, names, summary.run_id, since=started if force else None
        )
        outcomes: asyncio.Queue[StudyOutcome | None] = asyncio.Queue()
        screening = asyncio.ensure_future(_screen_batches(pending, run, outcomes.put_nowait))
        screening.add_done_callback(lambda _: outcomes.put_nowait(None))  # the end
        try:
            done = 0
            while (outcome := await outcomes.get()) is not None:
                done += 1
                _add(summary, outcome)
                if outcome.report is not None:
                    votes.append([r.abnormal if r.ok else None for r in outcome.report.readings])
                    rows.append(result_row(outcome.report, out, names))
                await monitor.advance(done, len(pending))
                if hook:
                    hook(done, len(pending), outcome)
            await screening  # its own error, if any, fails the run
        finally:
            screening.cancel()  # when the loop above failed; a no-op once it is done
            await run.panel.aclose()
    if warming is not None:
        await warming
    summary.fleiss_kappa, summary.kappa_studies = panel_kappa(votes)
    if (settings.review.requests if reviews is None else reviews) and not summary.shards:
        asked = await request_reviews(  # a sharded run's children asked for their own
            dest,
            out,
            [e.study_instance_uid for e in summary.review_queue],
            settings.review,
            config=config,
            requested_by=summary.run_id,
            storage=settings.storage,
        )
        summary.reviews_requested = asked.requested
    summary.finished_at = datetime.now(UTC)
    key = write_run_summary(dest, summary)
    await monitor.finish(summary, rows, key)
    logger.info(
        "reported %d of %d studies (%d skipped, %d claimed by other runs, %d degraded, "
        "%d for review, %d errors), %d model calls, $%.4f; summary at %s",
        summary.reported,
        summary.studies,
        summary.skipped,
        summary.claimed_elsewhere,
        summary.degraded,
        summary.needs_review,
        summary.errors,
        summary.model_calls,
        summary.cost_usd,
        key,
    )
    return summary


async def _screen_batches(
    studies: list[Study], run: Screening, finished: Callable[[StudyOutcome], None]
) -> None:
    """One ``screen-studies`` task run per ``runner.studies_per_task`` studies; enough of them
    at once to keep ``run.window`` full. Each study's outcome goes to ``finished``: from its
    task run as it ends, or here, as error records, when its task run failed for good."""
    size = run.settings.runner.studies_per_task
    n = len(studies)
    batches = [
        Batch(f"{i + 1}-{min(i + size, n)}-of-{n}", studies[i : i + size])
        for i in range(0, n, size)
    ]
    # twice what the window holds: a batch waiting on its last slow study does not idle it
    slots = asyncio.Semaphore(2 * -(-run.settings.max_studies_in_flight // size))

    async def one(batch: Batch) -> None:
        async with slots:
            # quote(): Prefect passes the objects as they are instead of walking them looking
            # for futures (≈25 ms of event-loop time per study otherwise)
            state = await screen_studies(
                quote(batch), quote(run), quote(finished), return_state=True
            )
        if state.is_completed():
            return
        for study in batch.studies:
            uid = study.study_instance_uid
            if uid not in batch.done:
                reason = batch.failed.get(uid) or state.message or "unknown error"
                records = study_errors(study, reason)
                await asyncio.to_thread(write_errors, run.dest, records)
                finished(StudyOutcome(uid, None, records, run.names.study(uid)))

    await asyncio.gather(*(one(b) for b in batches))


def _add(summary: RunSummary, outcome: StudyOutcome) -> None:
    summary.errors += len(outcome.errors)
    summary.claimed_elsewhere += outcome.elsewhere is not None
    report = outcome.report
    if report is None:
        return
    summary.reported += 1
    summary.degraded += report.status == "degraded"
    summary.needs_review += report.consensus.needs_review
    if report.consensus.needs_review:
        summary.review_queue.append(review_entry(report))
    paid = [r for r in report.readings if not r.cached]
    summary.model_calls += len(paid)
    summary.cache_hits += len(report.readings) - len(paid)
    summary.requests += sum(r.requests for r in paid)
    summary.input_tokens += sum(r.input_tokens for r in paid)
    summary.estimated_input_tokens += sum(r.estimated_input_tokens for r in paid)
    summary.output_tokens += sum(r.output_tokens for r in paid)
    summary.cost_usd = round(summary.cost_usd + sum(r.cost_usd for r in paid), 6)
    cached = sum(r.cost_usd for r in report.readings if r.cached)
    summary.cached_cost_usd = round(summary.cached_cost_usd + cached, 6)
    if report.impression is not None:  # the synthesis call (never cached)
        summary.model_calls += 1
        summary.requests += report.impression.requests
        summary.input_tokens += report.impression.input_tokens
        summary.output_tokens += report.impression.output_tokens
        summary.cost_usd = round(summary.cost_usd + report.impression.cost_usd, 6)
    summary.simulated = summary.simulated or report.simulated
    summary.fetched_bytes += report.fetched_bytes
    summary.fetched_bytes_by_study[report.study_instance_uid] = report.fetched_bytes
    count_published(summary, report)
