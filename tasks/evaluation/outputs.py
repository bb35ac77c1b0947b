"""What the evaluation shows: ROC and calibration plots (matplotlib), a Markdown summary, the
files under DEST and the Prefect artifacts and event of an evaluation run."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from prefect import task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from tasks.core.config import StorageConfig
from tasks.core.errors import LabelError
from tasks.core.schema import Report
from tasks.evaluation.metrics import METRICS, Label, Regression, parse_labels, predictions
from tasks.reports.write import report_key
from tasks.storage import Store, open_store, read_json, split_uri

__all__ = [
    "REGRESSION_EVENT",
    "calibration_png",
    "collect_reports",
    "dumps",
    "emit_regression",
    "load_labels",
    "metric_rows",
    "publish_artifacts",
    "read_labels",
    "roc_png",
    "summary_markdown",
    "write_outputs",
]

REGRESSION_EVENT = "radflow.evaluation.regression"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def roc_png(cases: Sequence[dict], metrics: Mapping) -> bytes:
    """ROC curve of the consensus score, with each model's operating point and its 95 % CI."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    y, _, score = predictions(cases, "consensus")
    if len(set(y.tolist())) == 2 and score is not None:
        fpr, tpr, _ = roc_curve(y, score)
        auroc = metrics["consensus"].get("auroc")
        ax.plot(fpr, tpr, marker="o", lw=2, label=f"consensus score (AUROC {auroc:.3f})")
    for name, m in metrics["models"].items():
        if m.get("sensitivity") is None or m.get("specificity") is None:
            continue
        x, yv = 1 - m["specificity"], m["sensitivity"]
        ci = m.get("ci95", {})
        lo_s, hi_s = ci.get("sensitivity", [None, None])
        lo_p, hi_p = ci.get("specificity", [None, None])
        yerr = [[yv - lo_s], [hi_s - yv]] if lo_s is not None else None
        xerr = [[x - (1 - hi_p)], [(1 - lo_p) - x]] if lo_p is not None else None
        ax.errorbar(x, yv, xerr=xerr, yerr=yerr, fmt="s", capsize=3, label=name)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="1 − specificity", ylabel="sensitivity")
    ax.set_title("ROC: consensus score and model operating points")
    ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def calibration_png(cases: Sequence[dict], bins: int = 5) -> bytes:
    """Observed share of abnormal studies against the consensus score (uniform bins)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
    y, _, score = predictions(cases, "consensus")
    if len(y) and score is not None:
        observed, predicted = calibration_curve(y, score, n_bins=bins, strategy="uniform")
        ax.plot(predicted, observed, marker="o", lw=2, label="consensus score")
        counts, _ = np.histogram(score, bins=bins, range=(0, 1))
        ax.bar(
            (np.arange(bins) + 0.5) / bins,
            counts / max(counts.sum(), 1),
            width=1 / bins,
            alpha=0.2,
            color="grey",
            label="share of studies",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="consensus score", ylabel="observed abnormal share")
    ax.set_title("Calibration of the consensus score")
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def _fmt(value: object) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _with_ci(m: Mapping, name: str) -> str:
    lo, hi = m.get("ci95", {}).get(name, [None, None])
    ci = f" ({_fmt(lo)}–{_fmt(hi)})" if lo is not None else ""
    return _fmt(m.get(name)) + ci


def metric_rows(metrics: Mapping) -> list[dict[str, object]]:
    """One row per subject (consensus first), for the table artifact."""
    subjects = {"consensus": metrics["consensus"], **metrics["models"]}
    return [
        {"subject": name, "n": m.get("n")} | {k: m.get(k) for k in METRICS}
        for name, m in subjects.items()
    ]


def summary_markdown(
    metrics: Mapping, changes: Mapping[str, Mapping[str, float]], regressions: Sequence[Regression]
) -> str:
    """The Markdown summary: metrics with 95 % CIs, the consensus confusion matrix, the change
    since the previous evaluation and any regression."""
    c = metrics["consensus"]
    lines = [f"# Accuracy evaluation — {len(metrics['cases'])} labelled studies read", ""]
    if metrics.get("missing"):
        lines += [
            f"{len(metrics['missing'])} labelled studies have no report (see metrics.json).",
            "",
        ]
    lines += ["| subject | n | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, m in {"consensus": c, **metrics["models"]}.items():
        cells = [_with_ci(m, k) for k in METRICS]
        lines.append(f"| {name} | {m.get('n')} | " + " | ".join(cells) + " |")
    cm = c.get("confusion") or {}
    lines += [
        "",
        "## Consensus confusion matrix",
        "",
        "| | truth abnormal | truth normal |",
        "|---|---|---|",
        f"| called abnormal | {cm.get('tp', 0)} (TP) | {cm.get('fp', 0)} (FP) |",
        f"| called normal | {cm.get('fn', 0)} (FN) | {cm.get('tn', 0)} (TN) |",
        "",
        "## Change since the previous evaluation",
        "",
    ]
    if changes:
        lines += ["| subject | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for name, d in changes.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{d[k]:+.3f}" if k in d else "–" for k in METRICS)
                + " |"
            )
    else:
        lines.append("No previous evaluation at this destination.")
    if regressions:
        lines += ["", "## ⚠ Regression", ""] + [f"- {r}" for r in regressions]
    return "\n".join(lines) + "\n"


def read_labels(uri: str, storage: StorageConfig | None = None) -> list[Label]:
    """The labels CSV at ``uri`` (local path or s3 uri, read with ``storage``), parsed and
    validated; or, for ``reviews:DEST``, the review verdicts stored under DEST
    (tasks/review/export.py)."""
    if uri.startswith("reviews:"):
        from tasks.review.export import review_labels

        return parse_labels(review_labels(uri, storage), uri)
    parent, name = split_uri(uri)
    try:
        raw = open_store(parent, storage).read_bytes(name)
    except FileNotFoundError as exc:
        raise LabelError(f'labels "{uri}" do not exist') from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelError(f'labels "{uri}" are not UTF-8 text: {exc.reason}') from exc
    return parse_labels(text, uri)


load_labels = task(
    name="load-labels", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10]
)(read_labels)


@task(name="collect-reports", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def collect_reports(dest: Store, uids: Sequence[str]) -> dict[str, Report]:
    """The report.json of every labelled study that has one under DEST."""
    out = {}
    for uid in uids:
        data = read_json(dest, report_key(uid))
        if data is not None:
            out[uid] = Report.model_validate(data)
    return out


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60] or "evaluation"


@task(name="write-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def write_outputs(dest: Store, files: Mapping[str, bytes]) -> list[str]:
    """Write ``{key: bytes}`` under DEST (metrics.json, reliability.json, PNGs, summary.md)."""
    types = {".json": "application/json", ".png": "image/png", ".md": "text/markdown"}
    for key, data in files.items():
        dest.write_bytes(key, data, types.get(key[key.rfind(".") :], "application/octet-stream"))
    return [f"{dest.uri.rstrip('/')}/{k}" for k in files]


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_artifacts(
    metrics: Mapping, summary: str, plots: Mapping[str, bytes], dest: str
) -> None:
    """Prefect artifacts: the metrics table, the Markdown summary and the plots (data URLs,
    so they show in the UI wherever DEST is)."""
    key = _artifact_key(f"evaluation-{dest}")
    create_table_artifact(
        metric_rows(metrics), key=f"{key}-metrics"[:100], description="metrics per model"
    )
    create_markdown_artifact(summary, key=f"{key}-summary"[:100], description="evaluation summary")
    for name, png in plots.items():
        url = "data:image/png;base64," + base64.b64encode(png).decode()
        create_image_artifact(url, key=_artifact_key(f"{key}-{name}"), description=name)


def emit_regression(regressions: Sequence[Regression], dest: str, margin: float) -> None:
    """Emit ``radflow.evaluation.regression`` naming every metric that dropped."""
    emit_event(
        event=REGRESSION_EVENT,
        resource={"prefect.resource.id": f"radflow.evaluation.{dest}", "radflow.dest": dest},
        payload={
            "margin": margin,
            "regressions": [
                {"subject": r.subject, "metric": r.metric, "before": r.before, "after": r.after}
                for r in regressions
            ],
        },
    )


def dumps(data: object) -> bytes:
    return json.dumps(data, indent=2, ensure_ascii=False).encode()
