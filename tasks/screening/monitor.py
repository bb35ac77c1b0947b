"""What a screening run shows in the Prefect UI: its name and tags, a progress artifact updated
as studies finish, a table of results per study and a Markdown summary with the review queue
and where the reports are."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from tasks.core.privacy import LogNames
from tasks.core.schema import Report, RunSummary
from tasks.core.words import yes_no
from tasks.screening.compare import comparison_rows, cost_note

__all__ = [
    "MODELS_KEY",
    "PROGRESS_KEY",
    "RESULTS_KEY",
    "SUMMARY_KEY",
    "RunMonitor",
    "report_location",
    "result_row",
    "run_name",
    "run_tags",
    "summary_markdown",
]

logger = logging.getLogger(__name__)

# artifact keys: lowercase letters, digits and dashes (Prefect's rule)
PROGRESS_KEY = "screen-progress"
RESULTS_KEY = "screen-results"
SUMMARY_KEY = "screen-summary"
MODELS_KEY = "screen-models"
_MAX_TAG = 100


def run_name(started: datetime, studies: int) -> str:
    """``screen-2026-11-27-12-studies``: what the run does, readable in the runs list."""
    return f"screen-{started:%Y-%m-%d}-{studies}-{'study' if studies == 1 else 'studies'}"


def run_tags(source: str, models: Iterable[str]) -> list[str]:
    """Tags to filter runs by in the UI: ``radflow``, ``source:<source>`` (the URI, or its
    pseudonym: :meth:`LogNames.source`), ``model:<name>``."""
    tags = ["radflow", f"source:{source}"[:_MAX_TAG]]
    tags += [f"model:{m}"[:_MAX_TAG] for m in models]
    return list(dict.fromkeys(tags))


def report_location(dest: str, uid: str, name: str = "report.md") -> str:
    """Where a study's report lives under DEST (a path or an s3:// URI)."""
    return f"{dest.rstrip('/')}/studies/{uid}/{name}"


def result_row(report: Report, dest: str, names: LogNames) -> dict[str, Any]:
    """One line of the results table; with pseudonyms, the study's log id and the command
    that finds its report instead of the UID and the report's path."""
    c = report.consensus
    uid = report.study_instance_uid
    study = names.study(uid)
    return {
        "study": study,
        "status": report.status,
        "abnormal": "-" if c.abnormal is None else yes_no(c.abnormal),
        "urgency": c.urgency.value if c.urgency else "-",
        "agreement": round(c.agreement, 2),
        "review": yes_no(c.needs_review),
        "reasons": "; ".join(c.review_reasons),
        "cost_usd": round(report.cost_usd, 6),
        "report": report_location(dest, uid) if names.plain else f"radflow lookup {dest} {study}",
    }


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _models_markdown(summary: RunSummary) -> list[str]:
    """The provider comparison's main columns (the full table: the screen-models artifact)."""
    if not summary.models:
        return []
    lines = [
        "## Models",
        "",
        "| model | provider | host | calls | failed | refused | p50 ms | p95 ms | cost (USD)"
        " | agreement |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in comparison_rows(summary.models):
        cells = [r["p50_ms"], r["p95_ms"], r["agreement"]]
        p50, p95, agreement = ("-" if c is None else f"{c:g}" for c in cells)
        cost = "-" if r["cost_usd"] is None else f"{r['cost_usd']:.4f}"
        lines.append(
            f"| {_md_escape(r['model'])} | {r['provider']} | {r['host']} | {r['calls']}"
            f" | {r['failed']} | {r['refused']} | {p50} | {p95} | {cost}{cost_note(r)}"
            f" | {agreement} |"
        )
    return [*lines, ""]


def _run_cost(summary: RunSummary) -> str:
    """The run's cost cell: the known calls' sum, with the calls it covers when some had no
    usage ("-" when none of them had)."""
    calls = summary.model_calls
    row = {"calls": calls, "cost_known": calls - summary.unknown_cost_readings}
    cost = "-" if calls and not row["cost_known"] else f"{summary.cost_usd:.4f}"
    return cost + cost_note(row)


def summary_markdown(
    summary: RunSummary, rows: Sequence[dict[str, Any]], summary_key: str, names: LogNames
) -> str:
    """The run summary: counts, cost, the review queue (most urgent first), report locations;
    the source and the studies as ``names`` names them."""
    urgency_rank = {"immediate": 0, "follow_up": 1, "normal": 2, "-": 3}
    queue = sorted(
        (r for r in rows if r["review"] == "yes"),
        key=lambda r: (urgency_rank.get(r["urgency"], 3), r["agreement"], r["study"]),
    )
    lines = [
        f"# Screening run {summary.run_id}",
        "",
        f"- source: `{names.source(summary.source)}`",
        f"- reports: `{summary.dest.rstrip('/')}/studies/`",
        f"- run summary: `{summary.dest.rstrip('/')}/{summary_key}`",
        "",
        "| studies | reported | skipped | degraded | for review | error records | model calls"
        " | cost (USD) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary.studies} | {summary.reported} | {summary.skipped} | {summary.degraded}"
        f" | {summary.needs_review} | {summary.errors} | {summary.model_calls}"
        f" | {_run_cost(summary)} |",
        "",
        *_models_markdown(summary),
        f"## Review queue ({len(queue)})",
        "",
    ]
    if queue:
        lines += ["| study | urgency | agreement | reasons | report |", "|---|---|---:|---|---|"]
        lines += [
            f"| {r['study']} | {r['urgency']} | {r['agreement']:.2f}"
            f" | {_md_escape(r['reasons']) or '-'} | `{r['report']}` |"
            for r in queue
        ]
    else:
        lines.append("Nothing to review in this run.")
    if summary.simulated:
        lines += ["", "> Readings came from radflow's **simulator** (a test double), not a model."]
    lines += [
        "",
        "AI-generated preliminary screening for review by a radiologist, not a diagnosis.",
    ]
    return "\n".join(lines) + "\n"


class RunMonitor:
    """Creates and updates the run's artifacts; a no-op outside a flow run (plain calls)."""

    def __init__(self, flow_run_id: str | UUID | None, names: LogNames) -> None:
        self.flow_run_id = UUID(str(flow_run_id)) if flow_run_id else None
        self.names = names
        self._progress: UUID | None = None
        self._shown = -1.0
        self._updated = 0.0  # time.monotonic() of the last update

    async def label(self, name: str, tags: Sequence[str]) -> None:
        """Rename the flow run and add tags (the deployment's own tags stay)."""
        if self.flow_run_id is None:
            return
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            run = await client.read_flow_run(self.flow_run_id)
            merged = list(dict.fromkeys([*run.tags, *tags]))
            await client.update_flow_run(self.flow_run_id, name=name, tags=merged)

    async def start(self, total: int) -> None:
        if self.flow_run_id is None:
            return
        from prefect.artifacts import acreate_progress_artifact

        self._progress = await acreate_progress_artifact(
            progress=100.0 if total == 0 else 0.0,
            key=PROGRESS_KEY,
            description=f"Studies screened out of {total}",
        )

    async def advance(self, done: int, total: int) -> None:
        """Update the progress artifact: at most once a second (the UI polls no faster) and
        every whole percent, and at the end."""
        if self._progress is None or total == 0:
            return
        percent = round(100.0 * done / total, 1)
        now = time.monotonic()
        if done < total and (percent - self._shown < 1.0 or now - self._updated < 1.0):
            return
        from prefect.artifacts import aupdate_progress_artifact

        await aupdate_progress_artifact(self._progress, progress=percent)
        self._shown, self._updated = percent, now

    async def finish(self, summary: RunSummary, rows: list[dict[str, Any]], summary_key: str):
        if self.flow_run_id is None:
            return
        from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

        if rows:
            await acreate_table_artifact(
                table=rows, key=RESULTS_KEY, description="Results per study (this run)"
            )
        if summary.models:
            await acreate_table_artifact(
                table=comparison_rows(summary.models),
                key=MODELS_KEY,
                description="Provider comparison per model: calls, latency, tokens, cost, "
                "agreement with the consensus" + (" (SIMULATED)" if summary.simulated else ""),
            )
        await acreate_markdown_artifact(
            markdown=summary_markdown(summary, rows, summary_key, self.names),
            key=SUMMARY_KEY,
            description="Run summary and review queue",
        )
