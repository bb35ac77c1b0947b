"""`radflow bridge`: S3 upload notifications on SQS → one Prefect ``radflow.study.ready`` event
per study, emitted once the study folder is quiet. Messages are deleted only after the Prefect
API accepted the event, so a crash loses nothing (SQS redelivers; the event id is stable)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.core.errors import NotificationError, StorageError
from tasks.ingest.events import PendingStudy, StudyBatcher, parse_notification, study_event

__all__ = ["BridgeStats", "emit_study_event", "run_bridge"]

logger = logging.getLogger("radflow.bridge")


@dataclass
class BridgeStats:
    messages: int = 0
    records: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    events: int = 0
    deleted: int = 0


def emit_study_event(event: dict[str, Any]) -> None:
    """Send one event to the Prefect API and return once it answered 2xx.

    ``prefect.events.emit_event`` hands events to a background websocket and cannot say whether
    the server took them; ``POST /api/events`` (the same ``Event`` model) answers 204 after the
    server published the event to its triggers, which is what deleting the message needs.
    """
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    body = [Event.model_validate(event).model_dump(mode="json")]
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=body).raise_for_status()


def _delete(sqs: Any, queue_url: str, handles: dict[str, str], ids: list[str]) -> int:
    deleted = 0
    for start in range(0, len(ids), 10):  # SQS deletes at most 10 per call
        batch = [i for i in ids[start : start + 10] if i in handles]
        if not batch:
            continue
        entries = [{"Id": str(n), "ReceiptHandle": handles[m]} for n, m in enumerate(batch)]
        answer = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        for failure in answer.get("Failed", []):
            logger.warning("could not delete message %s: %s", failure["Id"], failure["Message"])
        deleted += len(answer.get("Successful", []))
        for message_id in batch:
            handles.pop(message_id, None)
    return deleted


def run_bridge(
    queue_url: str,
    quiet_seconds: float = 5.0,
    *,
    wait_seconds: int = 1,
    stop: threading.Event | None = None,
    emit: Callable[[dict[str, Any]], None] = emit_study_event,
    clock: Callable[[], float] = time.monotonic,
) -> BridgeStats:
    """Consume ``queue_url`` until ``stop`` is set (forever without one).

    Long-polls SQS for at most ``wait_seconds`` (less when a study is about to become quiet),
    keeps each message invisible while its study waits, emits quiet studies oldest first.
    """
    if not queue_url.startswith(("https://", "http://")):
        raise StorageError(f'queue URL "{queue_url}" is not an SQS URL', hint="see infra/aws.md")
    sqs = boto3.client("sqs", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    # a message stays hidden while its study waits to be quiet, then until it is deleted
    visibility = int(max(30, 2 * quiet_seconds + 30))
    batcher = StudyBatcher(quiet_seconds)
    handles: dict[str, str] = {}  # message id → latest receipt handle
    stats = BridgeStats()
    stop = stop or threading.Event()
    logger.info("bridge on %s, quiet after %.1f s", queue_url, quiet_seconds)
    while not stop.is_set():
        deadline = batcher.next_deadline()
        wait = wait_seconds if deadline is None else max(0, min(wait_seconds, deadline - clock()))
        try:
            answer = sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=int(wait),
                VisibilityTimeout=visibility,
            )
        except (BotoCoreError, ClientError) as exc:
            logger.warning("receiving from %s failed (%s); retrying", queue_url, exc)
            stop.wait(min(wait_seconds, 5) or 1)
            continue
        for message in answer.get("Messages", []):
            stats.messages += 1
            message_id = message["MessageId"]
            handles[message_id] = message["ReceiptHandle"]
            try:
                records = parse_notification(message["Body"])
            except NotificationError as exc:
                # left on the queue: after maxReceiveCount the redrive policy moves it aside
                stats.bad_messages += 1
                handles.pop(message_id)
                logger.error("message %s skipped: %s", message_id, exc)
                continue
            stats.records += len(records)
            batcher.add(message_id, records, clock())
        stats.duplicates = batcher.duplicates
        stats.deleted += _delete(sqs, queue_url, handles, batcher.deletable())
        for study in batcher.ready(clock()):
            if not _emit(study, emit, clock()):
                stop.wait(1)  # the API is down: keep the messages, try again shortly
                break
            stats.events += 1
            stats.deleted += _delete(sqs, queue_url, handles, batcher.emitted(study))
    return stats


def _emit(study: PendingStudy, emit: Callable[[dict[str, Any]], None], now: float) -> bool:
    event = study_event(study)
    try:
        emit(event)
    except (httpx.HTTPError, OSError) as exc:  # keep the messages, retry on the next turn
        logger.warning("event for %s not accepted (%s); will retry", study.uri, exc)
        return False
    logger.info(
        "%s: %d objects (arriving over %.1f s, then quiet for %.1f s) → event %s",
        study.uri,
        len(study.objects),
        study.last_seen - study.first_seen,
        now - study.last_seen,
        event["id"],
    )
    return True
