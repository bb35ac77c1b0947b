"""The screening flow's coarse Prefect task, ``screen-studies``: one task run per batch of
studies (model calls are plain async calls inside it, see docs/design.md for why), and the
run's batches, whose outcomes come back as each study ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import import_module

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks.consensus.vote import KAPPA_MODULE
from tasks.core.config import RunnerConfig
from tasks.core.errors import StudiesFailed, is_transient, retry_if_transient
from tasks.ingest.discover import Study
from tasks.screening.plan import fail_unread
from tasks.screening.pool import warm
from tasks.screening.study import Screening, screen_study
from tasks.screening.summary import StudyOutcome

__all__ = ["Batch", "screen_studies", "screened", "warm_up"]

logger = logging.getLogger(__name__)


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
    # retries and their delays: runner.retry_delays, set per run (_screen_batches)
    retry_condition_fn=retry_if_transient,  # only when a study failed in a transient way
    timeout_seconds=1800,
    cache_policy=NO_CACHE,
    # no tags: a tagged task run asks the API for tag concurrency slots as it starts
)
async def screen_studies(
    batch: Batch, run: Screening, finished: Callable[[StudyOutcome], None]
) -> int:
    """Screen the studies of ``batch`` not done yet, each as soon as ``run.window`` has room,
    calling ``finished`` with each outcome as it comes. One task run per batch rather than
    per study: each task run costs the event loop and the Prefect API 10-40 ms (docs/design.md).
    A study that raises fails the task run once the others have finished; when one of them
    failed in a transient way (``is_transient``), Prefect's retries then screen the ones left;
    otherwise they end as error records at once (the same input would fail again)."""
    todo = [s for s in batch.studies if s.study_instance_uid not in batch.done]

    async def one(study: Study) -> None:
        async with run.window:
            outcome = await screen_study(study, run)
        batch.done.add(study.study_instance_uid)
        batch.failed.pop(study.study_instance_uid, None)
        finished(outcome)

    results = await asyncio.gather(*(one(s) for s in todo), return_exceptions=True)
    raised = [r for r in results if isinstance(r, BaseException)]
    for study, result in zip(todo, results, strict=True):
        if isinstance(result, BaseException):
            batch.failed[study.study_instance_uid] = f"{type(result).__name__}: {result}"
    if batch.failed:
        raise StudiesFailed(
            f"{len(batch.failed)} of {len(todo)} studies failed: "
            + "; ".join(f"{run.names.study(uid)}: {why}" for uid, why in batch.failed.items()),
            transient=any(is_transient(r) for r in raised),
        )
    return len(todo)


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
    delays = run.settings.runner.retry_delays
    task_run = screen_studies.with_options(retries=len(delays), retry_delay_seconds=delays or 0)

    async def one(batch: Batch) -> None:
        async with slots:
            # quote(): Prefect passes the objects as they are instead of walking them looking
            # for futures (≈25 ms of event-loop time per study otherwise)
            state = await task_run(quote(batch), quote(run), quote(finished), return_state=True)
        if state.is_completed():
            return
        for study in batch.studies:
            uid = study.study_instance_uid
            if uid not in batch.done:
                reason = batch.failed.get(uid) or state.message or "unknown error"
                finished(await asyncio.to_thread(fail_unread, run.dest, study, reason, run.names))

    await asyncio.gather(*(one(b) for b in batches))


async def screened(studies: list[Study], run: Screening) -> AsyncIterator[StudyOutcome]:
    """Screen ``studies`` in batches (``screen-studies`` task runs) and yield each study's
    outcome as it ends; then raise what the batches raised, if anything. Use it under
    ``contextlib.aclosing``: leaving early cancels the batches."""
    outcomes: asyncio.Queue[StudyOutcome | None] = asyncio.Queue()
    screening = asyncio.ensure_future(_screen_batches(studies, run, outcomes.put_nowait))
    screening.add_done_callback(lambda _: outcomes.put_nowait(None))  # the end
    try:
        while (outcome := await outcomes.get()) is not None:
            yield outcome
        await screening  # its own error, if any, fails the run
    finally:
        screening.cancel()  # when the consumer failed; a no-op once it is done


async def warm_up(runner: RunnerConfig, studies: int) -> None:
    """Load, while the first models read, what the run would otherwise load on the clock:
    the pool's processes or highdicom's tables (for the SRs), and statsmodels (for the kappa
    at the end, when more than one study is read); each takes a second or more."""
    loads = [warm(runner)]
    if studies > 1:
        loads.append(asyncio.to_thread(import_module, KAPPA_MODULE))
    await asyncio.gather(*loads)
