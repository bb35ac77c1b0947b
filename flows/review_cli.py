"""`radflow reviews list DEST` and `radflow reviews export DEST --out labels.csv`: the
radiologist verdicts on flagged studies (review.requests), as a listing and as labels."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flows.console import err, fail
from tasks.core.errors import ConfigError, RadflowError

__all__ = ["reviews"]

reviews = typer.Typer(
    help="Radiologist verdicts on flagged studies (review.requests): list them, export labels.",
    no_args_is_help=True,
)


def _out() -> Console:
    """Full study UIDs also when the output is not a terminal (rich assumes 80 columns)."""
    return Console(width=None if sys.stdout.isatty() else 200)


@reviews.command("list")
def reviews_list(
    dest: Annotated[str, typer.Argument(help="screening DEST: a folder or s3://bucket/prefix")],
    status: Annotated[
        list[str] | None, typer.Option(help="only this status (pending, done, ...); repeatable")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="config YAML (S3 settings)")] = None,
) -> None:
    """DEST's flagged studies and where each review stands: requested, pending (waiting for
    the radiologist), expired, not_requested, done (review.json), cleared (no longer flagged)."""
    from rich.table import Table

    from tasks.core.config import load_settings
    from tasks.review.export import STATUSES, review_rows, row_cells

    unknown = sorted(set(status or []) - set(STATUSES))
    if unknown:
        raise fail(ConfigError(f"unknown --status {unknown}", hint=f"one of {list(STATUSES)}"))
    try:
        rows = review_rows(dest, load_settings(config).storage)
    except RadflowError as exc:
        raise fail(exc) from None
    shown = [r for r in rows if not status or r.status in status]
    table = Table("study", "status", "AI", "when", "verdict", "review run", box=None)
    for row in shown:
        c = row_cells(row)
        table.add_row(c["study"], c["status"], c["ai"], c["when"], c["verdict"], c["run"])
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    _out().print(table, highlight=False)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
    _out().print(f"{len(rows)} flagged studies under {dest}: {summary}", highlight=False)


@reviews.command("export")
def reviews_export(
    dest: Annotated[str, typer.Argument(help="screening DEST: a folder or s3://bucket/prefix")],
    out: Annotated[Path, typer.Option("--out", help="labels CSV for `radflow evaluate`")],
    annotations: Annotated[
        Path | None, typer.Option(help="also write `radflow build-dataset` annotations (JSONL)")
    ] = None,
    images: Annotated[
        str | None, typer.Option(help="the screening SOURCE (annotation image keys are relative)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="config YAML (S3 settings)")] = None,
) -> None:
    """Write DEST's review verdicts as evaluation labels (study_instance_uid, abnormal,
    patient_id, findings) and, with --annotations and --images, as fine-tune annotations.
    Verdicts marked not assessable make no label."""
    from tasks.core.config import load_settings
    from tasks.review.export import export

    if annotations and not images:
        raise fail(
            ConfigError(
                "--annotations needs --images SOURCE",
                hint="the folder or s3:// prefix the studies were screened from: annotation "
                "image keys are relative to it",
            )
        )
    try:
        made = export(dest, images if annotations else None, load_settings(config).storage)
    except RadflowError as exc:
        raise fail(exc) from None
    if not made.labelled:
        raise fail(RadflowError(f'no usable review verdict under "{dest}"'), code=1)
    out.write_text(made.labels, encoding="utf-8")
    line = (
        f"{made.labelled} labels ({made.abnormal} abnormal, {made.labelled - made.abnormal} "
        f"normal; {made.not_assessable} not assessable left out) → {out}"
    )
    if annotations:
        annotations.write_text(made.annotations, encoding="utf-8")
        line += f"; {made.labelled - len(made.skipped)} annotations → {annotations}"
        for reason in made.skipped:
            err.print(f"not annotated: {reason}", markup=False, highlight=False)
    _out().print(line, highlight=False)
