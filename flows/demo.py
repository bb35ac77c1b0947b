"""``radflow demo``: sample studies → simulator → screening flow → a summary table.

Its console says only what radflow means to: the sample folder, the simulator, the progress
bar, the table and where the files are. Prefect is imported when the demo runs, after
``PREFECT_ENV`` is in the environment (a value the user set stays)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from simulator.process import panel_config, running_simulator
from simulator.samples import build_sample_folder
from tasks.core.words import short_result, urgency_word, yes_no

__all__ = ["PREFECT_ENV", "run_demo"]

DEMO_KEY_ENV = "RADFLOW_DEMO_KEY"
PREFECT_ENV = {
    # Prefect's console shows warnings and errors only: its INFO lines ("Starting temporary
    # server", each task's "Finished in state Completed()") still reach the API and the UI
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    # the demo's temporary server sends no telemetry heartbeat: offline it logs an error, and
    # its write to the server's SQLite can fail with "database is locked" (a traceback)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # nor does this process (Prefect's SDK telemetry, and its first-run notice on a terminal)
    "DO_NOT_TRACK": "1",
}


def demo_config(base_url: str, language: str) -> dict:
    """Both panel models pointed at the simulator, as a user would point them at a gateway."""
    return {
        "language": language,
        "preprocess": {"max_edge": 1024, "window": "auto"},
        "models": panel_config(base_url, DEMO_KEY_ENV),
    }


def summary_table(dest: Path) -> Table:
    """One row per report; compact enough for an 80-column terminal. A study with a reading
    whose cost is unknown (the answer carried no usage) shows the known part and ``+?``."""
    table = Table(
        title="radflow demo — SIMULATED readings (test double), not medical opinions",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    right = ("agree", "tokens", "cost $")
    for col in ("input", "modality", "consensus", "urgency", "agree", "review", "tokens", "cost $"):
        table.add_column(col, justify="right" if col in right else "left", no_wrap=True)
    for path in sorted(dest.glob("studies/*/report.json")):
        r = json.loads(path.read_text())
        c = r["consensus"]
        modality = ", ".join(sorted({i["modality"] or "?" for i in r["images"]}))
        colour = {True: "[red]", False: "[green]", None: ""}[c["abnormal"]]
        tokens = sum(x["input_tokens"] + x["output_tokens"] for x in r["readings"])
        unknown = any(not x.get("cost_known", True) for x in r["readings"])  # no usage given
        table.add_row(
            Path(r["sources"][0]).stem[:14] if r["sources"] else r["study_instance_uid"][-14:],
            modality,
            colour + short_result(c["abnormal"]),
            urgency_word(c["urgency"]) if c["urgency"] else "-",
            f"{c['agreement']:.0%}",
            yes_no(c["needs_review"]),
            str(tokens),
            f"{r['cost_usd']:.4f}" + ("+?" if unknown else ""),  # the known part, marked
        )
    return table


def run_demo(out: Path, *, synthetic: int, latency: float, language: str) -> None:
    """Build the sample folder, start the simulator, screen the samples, print the table."""
    for name, value in PREFECT_ENV.items():
        os.environ.setdefault(name, value)
    from flows.progress import run_with_progress  # imports Prefect: after PREFECT_ENV is set
    from flows.screen import screen

    console = Console()
    samples, dest = out / "samples", out / "reports"
    made = build_sample_folder(samples, synthetic=synthetic)
    console.print(
        f"sample folder {samples}: {len(made)} files "
        f"({sum('synthetic' in k for k in made)} synthetic, "
        f"{sum(k.startswith('real/') for k in made)} from pydicom-data, 1 non-DICOM)"
    )
    with running_simulator("--latency", str(latency), "--seed", "7") as sim:
        console.print(f"simulator (test double) on {sim.url}")
        config = out / "radflow.yaml"
        config.write_text(yaml.safe_dump(demo_config(sim.url, language), sort_keys=False))
        os.environ.setdefault(DEMO_KEY_ENV, "demo-key-not-secret")
        summary = run_with_progress(screen(str(samples), str(dest), str(config), force=True))
    console.print(summary_table(dest))
    console.print(
        f"{summary.reported} reports, {summary.errors} error records, {summary.model_calls} "
        f"model calls, {summary.input_tokens + summary.output_tokens} tokens, "
        f"${summary.cost_usd:.4f} (simulated)\n"
        f"reports: {dest}/studies/<StudyInstanceUID>/report.json and report.md\n"
        f"errors:  {dest}/errors/   run summary: {dest}/runs/{summary.run_id}.json",
        highlight=False,
    )
