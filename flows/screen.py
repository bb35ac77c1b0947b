"""The screening flow: discover → (per study: preprocess → diagnose → consensus → report) → summary;
a large run's studies as shards, child runs of this flow."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tasks.core.config import RunnerConfig, load_settings
from tasks.core.errors import ConfigError, ProviderRejected, retry_if_transient
from tasks.core.privacy import log_names, store_scheme
from tasks.core.schema import RunSummary
from tasks.ingest.discover import Inventory, Study, discover_studies
from tasks.ingest.events import SelectedObjects
from tasks.models.limits import check_limits
from tasks.pacs.publish import publish_target
from tasks.reports.write import write_errors, write_run_summary
from tasks.review.requests import request_reviews
from tasks.screening.batches import screened, warm_up
from tasks.screening.manifest import read_manifest, write_manifest
from tasks.screening.monitor import RunMonitor, run_name, run_tags
from tasks.screening.plan import earlier_reports, fail_unreported, plan_shards, to_read
from tasks.screening.pool import resolve_runner
from tasks.screening.shards import check_deployment, on_deployment, shard_summary
from tasks.screening.study import Screening
from tasks.screening.summary import StudyOutcome, Tally
from tasks.storage import Store, open_store

__all__ = ["progress_hook", "run_shards", "screen"]

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


def _first_run_name() -> str:
    """``screen-<date>-<store scheme>`` until discovery counts the studies (then
    ``screen-<date>-<n>-studies``): never the SOURCE path, which may name a patient."""
    scheme = store_scheme(flow_run.parameters.get("source"))
    return f"screen-{datetime.now(UTC):%Y-%m-%d}-{scheme}"


@flow(name="screen", flow_run_name=_first_run_name, log_prints=True)
async def screen(
    source: str | None = None,
    out: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    force: bool = False,
    keys: list[str] | None = None,
    reviews: bool | None = None,
    manifest: str | None = None,
) -> RunSummary:
    """Screen every study under ``source`` and write reports under ``out``.

    ``source``/``out`` default to the config's ``source``/``output`` (scheduled runs).
    ``keys`` (relative to ``source``) limits the run to those objects: an upload event's study.
    Studies already reported from the same inputs are skipped unless ``force``.
    ``reviews``: a review flow run per flagged study (None: the config's ``review.requests``).
    ``manifest``: a shard's plan under ``out`` (written by its parent run): its studies are
    read from it, without listing ``source`` or reading a header.
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
    if settings.limits == "global":
        await check_limits(settings)  # a missing limit fails here, before any model call
    src, dest = open_store(source, settings.storage), open_store(out, settings.storage)
    names = await asyncio.to_thread(log_names, dest, settings.privacy)
    if keys is not None:
        src = SelectedObjects(src, keys)
    if manifest is not None:  # a shard: its parent listed the source and read the headers
        inventory = Inventory(await asyncio.to_thread(read_manifest, dest, manifest, src), [])
    else:
        inventory = await asyncio.to_thread(discover, src, settings.storage.max_concurrency)
    discovery_bytes = getattr(src, "received", 0)  # a DICOMweb source: searches and metadata
    await asyncio.to_thread(write_errors, dest, inventory.errors, settings.storage.max_concurrency)
    if isinstance(src, SelectedObjects) and src.missing:
        listed = f": {src.missing}" if names.plain else " (names not logged)"
        logger.warning(
            "%d named objects are not under %s%s", len(src.missing), names.source(source), listed
        )
    studies = inventory.studies[:limit] if limit else inventory.studies
    pending = to_read(dest, studies, force, publish)
    skipped = len(studies) - len(pending)
    logger.info("%d studies, %d to read, %d already reported", len(studies), len(pending), skipped)

    run_id = str(flow_run.get_id() or started.strftime("%Y%m%dT%H%M%S"))
    tally = Tally(
        RunSummary(
            run_id=run_id,
            source=source,
            dest=out,
            studies=len(studies),
            skipped=skipped,
            errors=len(inventory.errors),
            started_at=started,
            discovery_bytes=discovery_bytes,
            header_reads=inventory.header_reads,
        ),
        names,
    )
    if manifest is not None and skipped:  # a re-run shard: its crashed run's readings count
        for report in await asyncio.to_thread(earlier_reports, dest, studies, pending):
            tally.add_earlier(report)
    hook = progress_hook.get()
    if hook:
        hook(0, len(pending), None)
    monitor = RunMonitor(flow_run.get_id(), names)
    labels = run_tags(names.source(source), [m.name for m in settings.models])
    await monitor.label(run_name(started, len(studies)), labels)
    await monitor.start(len(pending))
    stopped = None
    if settings.runner.shard_size and len(pending) > settings.runner.shard_size:
        child = {"source": source, "out": out, "config": config, "force": force}
        # see "Scaling out"; a key or model id rejected in a shard stops the whole run
        stopped = await run_shards(pending, child, settings.runner, src, dest, tally)
    elif pending:
        # `preprocess: auto` → threads or the process pool, by the size of this run
        settings = settings.model_copy(
            update={"runner": resolve_runner(settings.runner, len(pending))}
        )
        warming = asyncio.ensure_future(warm_up(settings.runner, len(pending)))
        # claims name the run; with --force, a report another run writes from now on is done
        run = await Screening.start(
            src, dest, settings, names, run_id, since=started if force else None
        )
        try:
            async with aclosing(screened(pending, run)) as outcomes:
                async for outcome in outcomes:
                    tally.add(outcome)
                    await monitor.advance(tally.done, len(pending))
                    if hook:
                        hook(tally.done, len(pending), outcome)
        finally:
            await run.panel.aclose()
        await warming
        stopped = run.panel.stop.error  # a rejected key or model id: no study read after it
    summary = tally.finish()
    summary.stopped = str(stopped) if stopped else None
    if (settings.review.requests if reviews is None else reviews) and not summary.shards:
        asked = await request_reviews(  # a sharded run's children asked for their own
            dest,
            out,
            [e.study_instance_uid for e in summary.review_queue],
            settings.review,
            config=config,
            requested_by=run_id,
            storage=settings.storage,
        )
        summary.reviews_requested = asked.requested
    summary.finished_at = datetime.now(UTC)
    key = write_run_summary(dest, summary)
    await monitor.finish(summary, tally.rows, key)
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
    if stopped is not None:
        raise stopped  # one line naming the model and its key or model id (the CLI prints it)
    return summary


async def run_shards(
    pending: list[Study],
    child: dict[str, Any],
    runner: RunnerConfig,
    src: Store,
    dest: Store,
    tally: Tally,
) -> ProviderRejected | None:
    """Screen ``pending`` as shards of ``runner.shard_size`` studies, ``runner.shards_in_flight``
    at a time: each a child run of :func:`screen` (or of ``runner.shard_deployment``) with the
    ``child`` parameters and the key of the shard's manifest under DEST (its studies as found
    here: the child neither lists nor reads a header). Each shard's summary goes into ``tally``;
    a shard that fails leaves error records for its studies without a report. When a provider
    rejects a key or model id in a shard, no further shard starts (their studies get error
    records) and the rejection is returned: the run stops as a single run does. The CLI's
    progress hook is fed the children's studies, counted over the whole run."""
    logger = get_run_logger()
    if runner.shard_deployment:
        await check_deployment(runner)
    hook = progress_hook.get()
    shards = plan_shards(pending, runner.shard_size)
    gate = asyncio.Semaphore(runner.shards_in_flight)
    done = 0
    stopped: list[str] = []  # a provider rejected a key or model id in a shard: no new shard

    def count(_done: int, _total: int, outcome: StudyOutcome | None) -> None:
        nonlocal done
        if outcome is not None and hook:
            done += 1
            hook(done, len(pending), outcome)

    async def one(index: int, studies: list[Study]) -> None:
        name = f"screen-shard-{index + 1:04d}-of-{len(shards):04d}"
        async with gate:
            if stopped:  # not read: error records, and a rerun reads them
                for study in studies:
                    tally.add_unread(fail_unreported(dest, study, f"not read: {stopped[0]}"))
                return
            logger.info("shard %d/%d: %d studies", index + 1, len(shards), len(studies))
            try:
                key = await asyncio.to_thread(
                    write_manifest, dest, tally.summary.run_id, index, src, studies
                )
                params = child | {"manifest": key}
                if runner.shard_deployment:
                    summary = await on_deployment(
                        runner.shard_deployment, params, dest, runner.shard_attempts
                    )
                else:
                    state = await screen.with_options(flow_run_name=name)(
                        **params, return_state=True
                    )
                    summary = shard_summary(state, name, dest)
            except Exception as exc:  # noqa: BLE001 — a failed shard becomes error records
                reason = f"shard {index + 1}/{len(shards)} failed: {exc}"
                logger.error("%s", reason)
                for study in studies:
                    tally.add_unread(fail_unreported(dest, study, reason))
                return
        tally.merge(summary)
        if summary.stopped:
            stopped.append(summary.stopped)

    token = progress_hook.set(count if hook else None)
    try:
        await asyncio.gather(*(one(i, studies) for i, studies in enumerate(shards)))
    finally:
        progress_hook.reset(token)
    return ProviderRejected(stopped[0]) if stopped else None
