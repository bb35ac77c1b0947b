"""`radflow screen SOURCE --out DEST [--config FILE] [--limit N] [--force] [--estimate]`: a
screening run of the flow in flows/screen.py, its closing lines and the provider comparison
(flows/runs_cli.py), or with ``--estimate`` each model's tokens and cost without a call."""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from flows.console import fail, out_console
from tasks.core.errors import RadflowError

if TYPE_CHECKING:
    from tasks.screening.estimate import RunEstimate

__all__ = ["print_estimate", "screen"]

logger = logging.getLogger(__name__)


def screen(
    source: Annotated[
        str,
        typer.Argument(
            help="s3://bucket/prefix, a local folder, or a PACS: dicomweb+http(s)://HOST:PORT/PATH"
            "[?QIDO filters, e.g. StudyDate=20260101-20261231&ModalitiesInStudy=CT]"
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="destination: s3://bucket/prefix or a folder")],
    config: Annotated[
        Path | None, typer.Option(help="config YAML (else $RADFLOW_CONFIG, ./radflow.yaml)")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="screen at most N studies")] = None,
    force: Annotated[bool, typer.Option(help="re-read studies that are already reported")] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            help="discover and preprocess only: print each model's tokens and cost; no model "
            "is called, no report is written"
        ),
    ] = False,
) -> None:
    """Screen every study under SOURCE and write reports under DEST."""
    from flows.progress import run_with_progress
    from flows.runs_cli import print_comparison
    from flows.screen import screen as screen_flow
    from tasks.core.config import load_settings
    from tasks.core.errors import PacsError
    from tasks.pacs.publish import check_pacs_settings, pacs_line
    from tasks.screening.study import MODELS_MODULE
    from tasks.storage import open_store

    try:
        settings = load_settings(config)  # fail fast, before a Prefect run exists
        check_pacs_settings(settings, source, out)
        for uri in (source, out):
            open_store(uri, settings.storage)  # a missing bucket or a 401: one line, no run
        if estimate:
            from tasks.screening.estimate import estimate_run

            print_estimate(estimate_run(source, out, settings, limit, force))
            return
        # the panel and both model SDKs (~1.5-2 s) load while Prefect starts the flow run (its
        # API calls, or its temporary server); the run's Screening.start waits for them
        threading.Thread(
            target=importlib.import_module, args=(MODELS_MODULE,), name="import-models", daemon=True
        ).start()
        summary = run_with_progress(
            screen_flow(
                source=source,
                out=out,
                config=str(config) if config else None,
                limit=limit,
                force=force,
            )
        )
    except RadflowError as exc:
        raise fail(exc) from None
    elsewhere = summary.claimed_elsewhere
    Console().print(
        f"reported {summary.reported}/{summary.studies} studies ({summary.skipped} skipped, "
        + (f"{elsewhere} claimed by other runs, " if elsewhere else "")
        + f"{summary.degraded} degraded, "
        f"{summary.needs_review} for review, {summary.errors} error records), "
        f"{summary.model_calls} model calls, ${summary.cost_usd:.4f}"
        + (
            f" (+ {summary.unknown_cost_readings} readings of unknown cost: no usage)"
            if summary.unknown_cost_readings
            else ""
        )
        + f" → {out}"
        + (f"; {summary.reviews_requested} review runs" if summary.reviews_requested else "")
        + ("  [SIMULATED readings]" if summary.simulated else ""),
        highlight=False,
    )
    print_comparison(summary)
    if summary.fetched_bytes or summary.discovery_bytes:
        Console().print(pacs_line(summary), highlight=False)
    if summary.publish_failed:
        failed = len(summary.publish_failed)
        raise fail(PacsError(f"{failed} SRs not published (see report.json: published)"), 1)


def print_estimate(estimate: RunEstimate) -> None:
    """``radflow screen --estimate``: per model the requests' tokens and their cost, and the
    total (input exactly as priced; output at most each model's max_output_tokens)."""
    table = Table(
        title=f"estimate: {estimate.to_read} of {estimate.studies} studies to read "
        f"({estimate.unreadable} without a renderable image, {estimate.errors} error records); "
        "no model called",
        title_justify="left",
    )
    headings = ("model", "provider", "model id", "cached", "calls", "images", "img tok", "text tok")
    for heading in headings:
        table.add_column(heading, justify="left" if heading[0] in "mp" else "right")
    for heading in ("in tok", "input $", "max out tok", "max total $"):
        table.add_column(heading, justify="right")
    for m in estimate.models:
        table.add_row(
            m.cfg.name,
            m.cfg.provider.value,
            m.cfg.model,
            str(m.cached),
            str(m.calls),
            str(m.images),
            str(m.image_tokens),
            str(m.text_tokens),
            str(m.input_tokens),
            f"{m.input_cost_usd:.4f}",
            str(m.max_output_tokens),
            f"{m.max_cost_usd:.4f}",
        )
    models = estimate.models
    table.add_row(
        "total",
        "",
        "",
        str(sum(m.cached for m in models)),
        str(sum(m.calls for m in models)),
        str(sum(m.images for m in models)),
        str(sum(m.image_tokens for m in models)),
        str(sum(m.text_tokens for m in models)),
        str(sum(m.input_tokens for m in models)),
        f"{sum(m.input_cost_usd for m in models):.4f}",
        str(sum(m.max_output_tokens for m in models)),
        f"{sum(m.max_cost_usd for m in models):.4f}",
        end_section=True,
    )
    out_console().print(table)
