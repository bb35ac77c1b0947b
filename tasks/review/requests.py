"""Review requests at the end of a screening run (``review.requests``): one review flow run
per flagged study on the review deployment, never two open at once for a study, none when the
study already has a verdict for the same images; expired reviews are asked again when
``review.on_timeout`` is ``reopen``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

from tasks.core.config import ReviewConfig
from tasks.core.errors import RadflowError
from tasks.core.privacy import LogNames
from tasks.core.schema import Report, ReviewState
from tasks.review.export import flagged_uids
from tasks.review.verdicts import (
    done_state,
    load_report,
    read_verdict,
    review_names,
    review_run_name,
    set_review_state,
    write_index,
)
from tasks.storage import Store

__all__ = ["Requests", "request_reviews"]

logger = logging.getLogger(__name__)

_OPEN = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED}
_IN_FLIGHT = 8  # studies handled at once (each: a few store reads and API calls)


@dataclass
class Requests:
    """What the request step did, per study."""

    requested: int = 0  # new review runs
    open: int = 0  # a review run was already waiting: none added
    done: int = 0  # a verdict for the same images exists
    expired: int = 0  # on_timeout: expire, and this study's review expired
    not_requested: int = 0  # no review deployment
    failed: int = 0  # this study's request failed (its report says why); the others went on


# one study's request may fail (the API, its report); the run and the other studies go on
_STUDY_ERRORS = (httpx.HTTPError, PrefectHTTPStatusError, RadflowError, ValueError)


def _idempotency(study: str, report: Report) -> str:
    """Per study and input version: one review run per attempt, even if asked twice."""
    return f"review-{study}-{report.inputs_fingerprint[:16]}"


def _unanswered(dest: Store, out: str, storage: Any, names: LogNames) -> list[str]:
    """Flagged studies of DEST whose review was asked for and is not done (for reopen)."""
    uids = []
    for uid in flagged_uids(out, storage):
        try:
            state = load_report(dest, uid).review
        except RadflowError as exc:  # listed by `radflow reviews list` as unreadable
            logger.warning("study %s is not reopened: %s", names.study(uid), exc)
            continue
        if state and state.status in ("requested", "pending", "expired"):
            uids.append(uid)
    return uids


async def request_reviews(
    dest: Store,
    out: str,
    uids: Sequence[str],
    review: ReviewConfig,
    *,
    config: str | None,
    requested_by: str | None,
    storage: Any = None,
) -> Requests:
    """Ask for a review of each study in ``uids`` (this run's review queue), and with
    ``on_timeout: reopen`` of every study under ``out`` whose review expired. When the review
    deployment does not exist, say so once and record ``not_requested`` on each report."""
    done = Requests()
    wanted = list(dict.fromkeys(uids))
    names = await asyncio.to_thread(review_names, dest)
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(review.deployment)
        except (ObjectNotFound, httpx.HTTPError, PrefectHTTPStatusError) as exc:
            missing = isinstance(exc, ObjectNotFound)
            reason = (
                f'deployment "{review.deployment}" not found on {client.api_url}'
                if missing
                else f"the Prefect API at {client.api_url} failed: {exc}"
            )
            logger.warning(
                "review.requests is on, but %s: %d flagged studies get no review run "
                "(deploy deployments/prefect.yaml, or run `radflow serve`, against this API)",
                reason,
                len(wanted),
            )
            for uid in wanted:
                await asyncio.to_thread(_not_requested, dest, uid, names, reason)
            done.not_requested = len(wanted)
            return done
        if review.on_timeout == "reopen":
            more = await asyncio.to_thread(_unanswered, dest, out, storage, names)
            wanted += [uid for uid in more if uid not in set(wanted)]
        gate = asyncio.Semaphore(_IN_FLIGHT)

        async def one(uid: str) -> None:
            async with gate:
                try:
                    outcome = await _request_one(
                        client,
                        deployment.id,
                        dest,
                        out,
                        uid,
                        names.study(uid),
                        review,
                        config,
                        requested_by,
                    )
                except _STUDY_ERRORS as exc:
                    logger.error("review of study %s not requested: %s", names.study(uid), exc)
                    why = f"request failed: {exc}"
                    await asyncio.to_thread(_not_requested, dest, uid, names, why)
                    outcome = "failed"
            setattr(done, outcome, getattr(done, outcome) + 1)

        await asyncio.gather(*(one(uid) for uid in wanted))
    logger.info(
        "reviews: %d requested, %d already open, %d done for the same images, %d expired, "
        "%d failed",
        done.requested,
        done.open,
        done.done,
        done.expired,
        done.failed,
    )
    return done


def _not_requested(dest: Store, uid: str, names: LogNames, reason: str) -> None:
    """Record on the report why no review run was created (when its report can be read)."""
    try:
        report = load_report(dest, uid)
        set_review_state(dest, report, ReviewState(status="not_requested", reason=reason))
    except RadflowError as exc:
        logger.error(
            "study %s: cannot record that no review was requested: %s", names.study(uid), exc
        )


def _state_of(run: Any, attempt: int) -> ReviewState:
    paused = run.state_type == StateType.PAUSED
    return ReviewState(
        status="pending" if paused else "requested",
        flow_run_id=str(run.id),
        flow_run_name=run.name,
        attempt=attempt,
        requested_at=run.created,
        expires_at=run.state.state_details.pause_timeout if paused and run.state else None,
    )


async def _request_one(
    client: Any,
    deployment_id: Any,
    dest: Store,
    out: str,
    uid: str,
    study: str,
    review: ReviewConfig,
    config: str | None,
    requested_by: str | None,
) -> str:
    report = await asyncio.to_thread(load_report, dest, uid)
    verdict = await asyncio.to_thread(read_verdict, dest, uid)
    if verdict is not None and verdict.report.inputs_fingerprint == report.inputs_fingerprint:
        if report.review is None or report.review.status != "done":  # rewritten by --force
            state = done_state(verdict)
            await asyncio.to_thread(set_review_state, dest, report, state)
        return "done"
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"review:{study}"])),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
    waiting = [r for r in runs if r.state_type in _OPEN]
    if waiting:
        run = waiting[-1]
        if report.review is None or report.review.flow_run_id != str(run.id):
            attempt = int(run.parameters.get("attempt", 1))
            await asyncio.to_thread(set_review_state, dest, report, _state_of(run, attempt))
        return "open"
    key = _idempotency(study, report)
    same_images = [r for r in runs if (r.idempotency_key or "").startswith(key + "-")]
    if same_images and review.on_timeout == "expire":
        if report.review is None or report.review.status != "expired":
            state = _state_of(same_images[-1], len(runs)).model_copy(update={"status": "expired"})
            await asyncio.to_thread(set_review_state, dest, report, state)
        return "expired"
    attempt = len(runs) + 1
    urgency = report.consensus.urgency.value if report.consensus.urgency else "unread"
    await asyncio.to_thread(write_index, dest, study, uid)  # the run's parameters hold the id
    run = await run_deployment(
        deployment_id,
        parameters={
            "study": study,
            "out": out,
            "config": config,
            "attempt": attempt,
            "requested_by": requested_by,
        },
        flow_run_name=review_run_name(report, study, attempt),
        timeout=0,
        tags=["radflow", "review", f"review:{study}", f"urgency:{urgency}"],
        idempotency_key=f"{key}-{attempt}",
        as_subflow=False,
    )
    report = await asyncio.to_thread(load_report, dest, uid)
    if report.review is None or report.review.flow_run_id != str(run.id):  # not started yet
        state = ReviewState(
            status="requested",
            flow_run_id=str(run.id),
            flow_run_name=run.name,
            attempt=attempt,
            requested_at=datetime.now(UTC),
        )
        await asyncio.to_thread(set_review_state, dest, report, state)
    logger.info("review of study %s requested: flow run %s", study, run.name)
    return "requested"
