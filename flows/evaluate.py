"""The accuracy-evaluation flow: labels → screening (subflow, cache shared) → per-case table →
metrics with CIs, reliability, plots → DEST and artifacts → regression alert."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from flows.screen import screen
from tasks.core.config import load_settings
from tasks.core.errors import EvaluationRegression, LabelError
from tasks.evaluation.metrics import (
    case_table,
    compute_metrics,
    find_regressions,
    measure_reliability,
    metric_changes,
)
from tasks.evaluation.outputs import (
    calibration_png,
    collect_reports,
    dumps,
    emit_regression,
    load_labels,
    publish_artifacts,
    roc_png,
    summary_markdown,
    write_outputs,
)
from tasks.storage import open_store, read_json

__all__ = ["evaluate_accuracy"]


@flow(name="evaluate-accuracy", flow_run_name="evaluate-{images}", log_prints=True)
async def evaluate_accuracy(
    labels: str,
    images: str,
    out: str,
    config: str | None = None,
    margin: float | None = None,
) -> dict:
    """Screen the labelled ``images`` into ``out`` (every study is read again; the reading
    cache makes unchanged readings free), then measure the consensus and every model against
    ``labels`` and write ``out``/metrics.json, reliability.json, roc.png, calibration.png and
    summary.md. A drop of sensitivity or specificity by more than ``margin`` (default: the
    config's ``evaluation.regression_margin``) since the previous evaluation at ``out`` emits
    ``radflow.evaluation.regression`` and fails the run."""
    logger = get_run_logger()
    settings = load_settings(config)
    margin = settings.evaluation.regression_margin if margin is None else margin
    started = datetime.now(UTC)
    label_list = load_labels(labels, settings.storage)
    # every study read again (force); labelled studies need no review runs
    await screen(source=images, out=out, config=config, force=True, reviews=False)

    dest = open_store(out, settings.storage)
    uids = [label.study_instance_uid for label in label_list]
    reports = collect_reports(dest, uids)
    cases = case_table(label_list, reports)
    if not cases:
        raise LabelError(f'none of the {len(uids)} studies labelled in "{labels}" is in "{images}"')
    missing = [uid for uid in uids if uid not in reports]
    models = [m.name for m in settings.models]
    metrics = await asyncio.to_thread(
        compute_metrics,
        cases,
        models,
        settings.evaluation.bootstrap_resamples,
        settings.evaluation.seed,
    )
    previous = read_json(dest, "metrics.json")
    changes = metric_changes(previous, metrics)
    regressions = find_regressions(previous, metrics, margin)
    metrics |= {
        "created_at": started.isoformat(),
        "labels": labels,
        "images": images,
        "bootstrap": {
            "resamples": settings.evaluation.bootstrap_resamples,
            "seed": settings.evaluation.seed,
            "method": "percentile",
        },
        "change_since_previous": changes,
        "regressions": [str(r) for r in regressions],
        "missing": missing,
        "cases": cases,
    }
    reliability = measure_reliability(cases, models, source=labels)
    plots = {"roc.png": roc_png(cases, metrics), "calibration.png": calibration_png(cases)}
    summary = summary_markdown(metrics, changes, regressions)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    write_outputs(
        dest,
        {
            "metrics.json": dumps(metrics),
            f"evaluations/{stamp}/metrics.json": dumps(metrics),
            "reliability.json": dumps(reliability),
            "summary.md": summary.encode(),
            **plots,
        },
    )
    publish_artifacts(metrics, summary, plots, out)
    c = metrics["consensus"]
    logger.info(
        "consensus on %d studies: sensitivity %s, specificity %s, AUROC %s; %d labelled "
        "studies without a report",
        c["n"],
        c["sensitivity"],
        c["specificity"],
        c["auroc"],
        len(missing),
    )
    if regressions:
        emit_regression(regressions, out, margin)
        raise EvaluationRegression(
            f"accuracy regressed at {out} by more than {margin:.3f}: "
            + "; ".join(str(r) for r in regressions)
        )
    return metrics
