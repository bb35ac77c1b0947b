"""The review flow: one flagged study's page in the Prefect UI (key images, consensus and each
model's reading), then a typed form; the radiologist's verdict becomes studies/<uid>/review.json
and the report's review state.

The run suspends while it waits (``suspend_flow_run``: no process, no infrastructure held) and
Prefect runs it again from the start when the form is submitted, so everything before the
suspension is idempotent: it reads, renders and posts the page only on the first pass."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run

from tasks.core.config import load_settings
from tasks.core.errors import ReviewError
from tasks.core.schema import ErrorRecord, Report, ReviewState
from tasks.reports.write import write_error
from tasks.review.page import form_description, page_images, page_key, render_page, verdict_markdown
from tasks.review.verdicts import (
    ReviewForm,
    Verdict,
    done_state,
    index_key,
    load_report,
    read_verdict,
    resolve,
    set_review_state,
    verdict_from_form,
    write_verdict,
)
from tasks.storage import Store, open_store

__all__ = ["review"]

PAUSE_KEY = "verdict"


@task(name="record-verdict", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def record_verdict(dest: Store, report: Report, verdict: Verdict) -> str:
    """review.json first, then the report's review state (a rerun finds the verdict)."""
    key = write_verdict(dest, verdict)
    state = done_state(verdict, report.review)
    set_review_state(dest, report, state)
    return key


def _load(dest: Store, out: str, study: str) -> Report:
    """The study's report, or an error record naming what is missing and a failed run."""
    try:
        return load_report(dest, resolve(dest, study))
    except ReviewError as exc:
        source = f"{out.rstrip('/')}/{index_key(study)}"
        write_error(
            dest, ErrorRecord(source=source, reason=str(exc), kind=exc.kind, stage="review")
        )
        raise


@flow(name="review", log_prints=True)
async def review(
    study: str,
    out: str,
    config: str | None = None,
    attempt: int = 1,
    requested_by: str | None = None,
) -> dict:
    """Post the review page of ``study`` (its review id: DEST's ``review/ids/<id>.json`` holds
    its UID, so the parameters carry no identifier) reported under ``out``, wait for the
    radiologist's form, store the verdict. ``attempt`` counts the review runs asked for this
    study; ``requested_by`` is the screening run that asked."""
    logger = get_run_logger()
    settings = load_settings(config)
    dest = open_store(out, settings.storage)
    run_id, run_name = str(flow_run.get_id() or ""), flow_run.get_name()
    report = await asyncio.to_thread(_load, dest, out, study)
    uid, plain = report.study_instance_uid, settings.privacy.log_uids == "plain"
    earlier = await asyncio.to_thread(read_verdict, dest, uid)
    if earlier is not None and earlier.flow_run_id == run_id and run_id:
        logger.info("the verdict of this run is already stored; nothing to do")
        return earlier.model_dump(mode="json")

    images = await asyncio.to_thread(page_images, dest, report, settings.review.page_image_edge)
    state = report.review
    ours = state is not None and state.flow_run_id == run_id
    if not (ours and state.status == "pending"):  # the first pass
        hours = settings.review.timeout_hours
        now = datetime.now(UTC)
        state = ReviewState(
            status="pending",
            flow_run_id=run_id or None,
            flow_run_name=run_name,
            attempt=attempt,
            requested_at=state.requested_at if ours and state.requested_at else now,
            expires_at=now + timedelta(hours=hours) if hours else None,
        )
        page = render_page(report, images, study, out, state, show_uid=plain)
        await acreate_markdown_artifact(
            page, key=page_key(study), description=f"Review page of study {study}"
        )
        report = await asyncio.to_thread(set_review_state, dest, report, state)
        logger.info(
            "review page posted (%d key images, %.0f KB); waiting for the radiologist%s",
            len(images),
            len(page) / 1024,
            f" until {state.expires_at:%Y-%m-%d %H:%M} UTC" if state.expires_at else "",
        )
    form = ReviewForm.with_initial_data(description=form_description(report, images, study))
    timeout = round(settings.review.timeout_hours * 3600) or None
    answer = await suspend_flow_run(wait_for_input=form, timeout=timeout, key=PAUSE_KEY)

    verdict = verdict_from_form(
        answer,
        report,
        flow_run_id=run_id or None,
        flow_run_name=run_name,
        attempt=attempt,
        requested_at=state.requested_at,
    )
    key = await asyncio.to_thread(record_verdict, dest, report, verdict)
    await acreate_markdown_artifact(
        verdict_markdown(verdict, study, show_uid=plain),
        key=f"{page_key(study)}-verdict",
        description=f"Verdict on study {study}",
    )
    logger.info(
        "verdict by %s on study %s stored (%s; abnormal=%s, urgency=%s, not assessable=%s)",
        verdict.reviewer,
        study,
        key if plain else "review.json",
        verdict.abnormal,
        verdict.urgency.value if verdict.urgency else None,
        verdict.not_assessable,
    )
    return verdict.model_dump(mode="json")
