"""`radflow runs compare RUN_SUMMARY... [--plot FILE.png]`: the provider comparison of one or
more runs (DEST/runs/<id>.json, local or s3://) side by side, and the table the screen command
prints as it ends."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.console import fail, out_console
from tasks.core.errors import RadflowError
from tasks.core.schema import ModelStats, RunSummary

__all__ = ["comparison_table", "print_comparison", "runs"]

logger = logging.getLogger(__name__)

runs = typer.Typer(help="Run summaries (DEST/runs/<id>.json): compare runs.", no_args_is_help=True)

# (row key, column heading) of the table; the rows come from tasks.screening.compare
# (the cost columns say "(N of M calls)" when only N calls' cost is known)
_COLUMNS = (
    ("model", "model"),
    ("provider", "provider"),
    ("model_id", "model id"),
    ("host", "host"),
    ("calls", "calls"),
    ("answered", "ok"),
    ("failed", "failed"),
    ("refused", "refused"),
    ("retried", "retried"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("max_ms", "max ms"),
    ("input_tokens", "in tok"),
    ("image_tokens", "img tok"),
    ("output_tokens", "out tok"),
    ("cost_usd", "cost $"),
    ("cost_per_study_usd", "$/study"),
    ("agreement", "agree"),
)
_COST_KEYS = ("cost_usd", "cost_per_study_usd")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def comparison_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """A rich table of :func:`tasks.screening.compare.comparison_rows` (with a run column
    when the rows have one); a partial cost is marked with the calls it covers."""
    from tasks.screening.compare import cost_note

    columns = ([("run", "run")] if rows and "run" in rows[0] else []) + list(_COLUMNS)
    table = Table(title=title, title_justify="left")
    for key, heading in columns:
        numeric = key not in ("run", "model", "provider", "model_id", "host")
        table.add_column(heading, justify="right" if numeric else "left", no_wrap=key == "run")
    for row in rows:
        table.add_row(
            *(
                _cell(row.get(key)) + (cost_note(row) if key in _COST_KEYS else "")
                for key, _ in columns
            )
        )
    return table


def print_comparison(summary: RunSummary) -> None:
    """The provider comparison of a finished run, as the screen command's closing table."""
    from tasks.screening.compare import comparison_rows

    if not summary.models:
        return
    title = "provider comparison" + (" (SIMULATED readings)" if summary.simulated else "")
    out_console().print(comparison_table(comparison_rows(summary.models), title))


def _read_summary(uri: str, storage: Any) -> RunSummary:
    from pydantic import ValidationError

    from tasks.core.errors import RunSummaryError
    from tasks.storage import open_store, split_uri

    root, key = split_uri(uri)
    store = open_store(root, storage)
    if not store.exists(key):
        raise RunSummaryError(f'"{uri}": no such run summary')
    try:
        return RunSummary.model_validate_json(store.read_bytes(key))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "file"
        raise RunSummaryError(f'"{uri}" is not a run summary: {where}: {first["msg"]}') from None


def plot_comparison(summaries: Sequence[tuple[str, RunSummary]], path: Path) -> None:
    """A PNG: each (run, model)'s latency distribution (calls per latency bucket, log scale)
    beside its cost per study (over the calls whose cost is known: a partial bar is labelled
    with the calls it covers, a model without any known cost has no bar, "cost unknown")."""
    from matplotlib.figure import Figure

    from tasks.screening.compare import comparison_rows, cost_note, latency_samples

    fig = Figure(figsize=(11, 4.5))
    latency, cost = fig.subplots(1, 2)
    labels, costs = [], []
    for run, summary in summaries:
        stats: Mapping[str, ModelStats] = summary.models
        for row in comparison_rows(stats, run):
            label = f"{row['model']} ({run})" if len(summaries) > 1 else row["model"]
            points = list(latency_samples(stats[row["model"]]))
            if points:
                xs, ns = zip(*points, strict=True)
                latency.step(xs, ns, where="mid", label=label)
            per_study = row["cost_per_study_usd"]
            labels.append(label + (cost_note(row) if per_study is not None else " (cost unknown)"))
            costs.append(per_study or 0.0)  # no bar when unknown: the label says so
    latency.set_xscale("log")
    latency.set_xlabel("latency per call (ms, buckets of ×1.1)")
    latency.set_ylabel("calls")
    latency.set_title("latency distribution")
    if labels:
        latency.legend(fontsize="small")
    cost.barh(labels, costs)
    cost.set_xlabel("USD per study (calls whose cost is known)")
    cost.set_title("cost per study")
    if any(s.simulated for _, s in summaries):
        fig.suptitle("SIMULATED readings (radflow simulator, a test double)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


@runs.command("compare")
def compare(
    summaries: Annotated[
        list[str], typer.Argument(help="run summaries: DEST/runs/<id>.json, local or s3://")
    ],
    plot: Annotated[
        Path | None, typer.Option(help="also write a PNG: latency distribution, cost per study")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="config YAML (for S3 settings)")] = None,
) -> None:
    """The provider comparison of each run, one table across runs (e.g. the same studies
    through a gateway and direct)."""
    from tasks.core.config import load_settings
    from tasks.screening.compare import comparison_rows

    try:
        storage = load_settings(config).storage
        loaded = [(uri, _read_summary(uri, storage)) for uri in summaries]
    except RadflowError as exc:
        raise fail(exc) from None
    rows = [row for _, s in loaded for row in comparison_rows(s.models, s.run_id)]
    simulated = any(s.simulated for _, s in loaded)
    title = f"provider comparison of {len(loaded)} run(s)" + (
        " (SIMULATED readings)" if simulated else ""
    )
    out_console().print(comparison_table(rows, title))
    for uri, s in loaded:
        if not s.models:
            out_console().print(f"{uri}: no model calls recorded", highlight=False)
    if plot is not None:
        plot_comparison([(s.run_id, s) for _, s in loaded], plot)
        out_console().print(f"plot → {plot}", highlight=False)
