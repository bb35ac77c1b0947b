"""Accuracy of the panel against labels: per-case table, scikit-learn metrics, seeded bootstrap
95 % confidence intervals, per-finding metrics and regressions against a previous evaluation."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sklearn import config_context
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tasks.consensus.reliability import METHOD, log_odds_weight
from tasks.core.errors import LabelError
from tasks.core.schema import Report
from tasks.core.words import parse_abnormal

__all__ = [
    "METRICS",
    "Label",
    "Regression",
    "binary_metrics",
    "bootstrap_ci",
    "case_table",
    "compute_metrics",
    "find_regressions",
    "finding_metrics",
    "measure_reliability",
    "metric_changes",
    "parse_labels",
    "predictions",
]

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "cohen_kappa")


@dataclass(frozen=True)
class Label:
    """One labelled study: ground truth ``abnormal`` (0/1) and, optionally, its findings."""

    study_instance_uid: str
    abnormal: int
    patient_id: str | None = None
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Regression:
    """A metric that dropped by more than the margin since the previous evaluation."""

    subject: str  # "consensus" or a model name
    metric: str
    before: float
    after: float

    def __str__(self) -> str:
        return f"{self.subject} {self.metric} {self.before:.3f} → {self.after:.3f}"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def parse_labels(text: str, name: str) -> list[Label]:
    """Labels from CSV text with at least ``study_instance_uid,abnormal`` (0/1, or any word
    of :func:`tasks.core.words.parse_abnormal`; blank is an error); optional
    ``patient_id`` and ``findings`` (separated by ``;`` or ``|``). ``name`` names the input in
    errors."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = {c.strip() for c in reader.fieldnames or []}
    missing = {"study_instance_uid", "abnormal"} - columns
    if missing:
        raise LabelError(f'labels "{name}" lack the column(s) {", ".join(sorted(missing))}')
    labels: dict[str, Label] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        uid = row["study_instance_uid"]
        if not uid:
            raise LabelError(f'labels "{name}" line {line}: empty study_instance_uid')
        bad = f'labels "{name}" line {line}: abnormal must be 0 or 1, not "{row["abnormal"]}"'
        try:
            abnormal = parse_abnormal(row["abnormal"])
        except ValueError as exc:
            raise LabelError(f"{bad} ({exc})") from None
        if abnormal is None:
            raise LabelError(f"{bad} (blank)")
        if uid in labels:
            raise LabelError(f'labels "{name}" line {line}: study {uid} is labelled twice')
        raw = row.get("findings", "").replace("|", ";")
        findings = tuple(sorted({_norm(f) for f in raw.split(";") if f.strip()}))
        labels[uid] = Label(uid, int(abnormal), row.get("patient_id") or None, findings)
    if not labels:
        raise LabelError(f'labels "{name}" hold no rows')
    return list(labels.values())


def case_table(labels: Sequence[Label], reports: Mapping[str, Report]) -> list[dict]:
    """One row per labelled study that has a report: truth and every prediction."""
    cases = []
    for label in labels:
        report = reports.get(label.study_instance_uid)
        if report is None:
            continue
        c = report.consensus
        case: dict = {
            "study_instance_uid": label.study_instance_uid,
            "truth": label.abnormal,
            "consensus": {
                "predicted": None if c.abnormal is None else int(c.abnormal),
                "score": c.score,
            },
            "models": {
                r.model: {"predicted": int(r.abnormal) if r.ok and r.abnormal is not None else None}
                for r in report.readings
            },
        }
        if label.findings or any(lb.findings for lb in labels):
            case["findings"] = list(label.findings)
            case["consensus"]["findings"] = [f.text for f in c.findings]
        cases.append(case)
    return cases


def predictions(
    cases: Iterable[dict], subject: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(truth, predicted, score) of ``subject`` ("consensus" or a model name) over the cases it
    answered; score is the consensus score (None for a single model)."""
    rows = []
    for case in cases:
        pred = case["consensus"] if subject == "consensus" else case["models"].get(subject)
        if pred is None or pred["predicted"] is None:
            continue
        score = pred.get("score")
        rows.append(
            (case["truth"], pred["predicted"], pred["predicted"] if score is None else score)
        )
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), None
    arr = np.asarray(rows, dtype=float)
    score = arr[:, 2] if subject == "consensus" else None
    return arr[:, 0].astype(int), arr[:, 1].astype(int), score


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def binary_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None = None
) -> dict[str, object]:
    """Point estimates with scikit-learn; undefined values (e.g. PPV with no positive call)
    are None. AUROC ranks ``y_score`` (the binary prediction when there is no score)."""
    out: dict[str, object] = {"n": len(y_true)}
    if not len(y_true):
        return out | dict.fromkeys(METRICS)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        prec, rec, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=[1, 0], average=None, zero_division=np.nan
        )
        kappa = cohen_kappa_score(y_true, y_pred, labels=[0, 1])
        both = len(set(y_true.tolist())) == 2
        ranked = y_pred if y_score is None else y_score
        auroc = roc_auc_score(y_true, ranked) if both else np.nan
    out |= {
        "accuracy": _num(accuracy_score(y_true, y_pred)),
        "sensitivity": _num(rec[0]),
        "specificity": _num(rec[1]),
        "ppv": _num(prec[0]),
        "npv": _num(prec[1]),
        "f1": _num(f1[0]),
        "auroc": _num(auroc),
        "cohen_kappa": _num(kappa),
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }
    if y_score is not None:
        out["brier"] = _num(brier_score_loss(y_true, y_score))
    return out


_CELLS = (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))  # (truth, call) of tn, fp, fn, tp


def _table_metrics(tn: int, fp: int, fn: int, tp: int) -> tuple[float, float]:
    """(accuracy, Cohen's kappa) of one confusion table, by scikit-learn on the four cells
    weighted by their counts."""
    truth, call = _CELLS
    weights = np.array([tn, fp, fn, tp])
    return (
        accuracy_score(truth, call, sample_weight=weights),
        cohen_kappa_score(truth, call, labels=[0, 1], sample_weight=weights),
    )


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_score: np.ndarray | None,
    resamples: int,
    seed: int,
) -> dict[str, list[float | None]]:
    """Percentile 95 % intervals from ``resamples`` seeded resamples of the cases (the same
    resamples for every subject of equal size, so intervals are paired). Every value comes
    from scikit-learn: the resamples are the columns of one multilabel problem; accuracy and
    kappa depend only on the confusion table, so they are computed once per distinct table. Resamples holding a single class are dropped
    (sensitivity, specificity and AUROC are undefined there)."""
    n = len(y_true)
    if n < 2:
        return {m: [None, None] for m in METRICS}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    t = y_true[idx]
    idx = idx[(t.min(axis=1) == 0) & (t.max(axis=1) == 1)]
    if not len(idx):
        return {m: [None, None] for m in METRICS}
    t, p = y_true[idx].T, y_pred[idx].T  # one column per resample
    s = (y_pred if y_score is None else y_score)[idx].T
    # inputs are checked 0/1 arrays: skip scikit-learn's per-call validation (most of the cost)
    with (
        warnings.catch_warnings(),
        config_context(assume_finite=True, skip_parameter_validation=True),
    ):
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        ppv, sens, f1, _ = precision_recall_fscore_support(t, p, average=None, zero_division=np.nan)
        npv, spec, _, _ = precision_recall_fscore_support(
            1 - t, 1 - p, average=None, zero_division=np.nan
        )
        tables = multilabel_confusion_matrix(t, p).reshape(-1, 4)  # tn, fp, fn, tp per resample
        distinct, inverse = np.unique(tables, axis=0, return_inverse=True)
        per_table = np.array([_table_metrics(*row) for row in distinct])[inverse.ravel()]
        values = {
            "accuracy": per_table[:, 0],
            "sensitivity": sens,
            "specificity": spec,
            "ppv": ppv,
            "npv": npv,
            "f1": f1,
            "auroc": np.asarray(roc_auc_score(t, s, average=None)),
            "cohen_kappa": per_table[:, 1],
        }
        out = {}
        for name, v in values.items():
            v = v[np.isfinite(v)]
            lo, hi = np.percentile(v, [2.5, 97.5]) if len(v) else (np.nan, np.nan)
            out[name] = [_num(lo), _num(hi)]
    return out


def finding_metrics(cases: Sequence[dict]) -> dict[str, dict]:
    """Per labelled finding term: truth = the term is labelled, predicted = some consensus
    finding contains it (case-insensitive). Only cases with a consensus reading count."""
    read = [c for c in cases if c["consensus"]["predicted"] is not None and "findings" in c]
    terms = sorted({f for c in read for f in c["findings"]})
    out = {}
    for term in terms:
        truth = np.array([int(term in c["findings"]) for c in read])
        said = [" ".join(_norm(f) for f in c["consensus"]["findings"]) for c in read]
        pred = np.array([int(term in s) for s in said])
        out[term] = binary_metrics(truth, pred) | {"positives": int(truth.sum())}
    return out


def compute_metrics(
    cases: Sequence[dict], models: Sequence[str], resamples: int, seed: int
) -> dict[str, object]:
    """metrics.json's ``consensus`` and ``models`` sections (plus ``findings`` when labelled)."""

    def subject(name: str) -> dict:
        y, p, s = predictions(cases, name)
        metrics = binary_metrics(y, p, s)
        metrics["ci95"] = bootstrap_ci(y, p, s, resamples, seed)
        return metrics

    out: dict[str, object] = {
        "consensus": subject("consensus"),
        "models": {m: subject(m) for m in models},
    }
    if any("findings" in c for c in cases):
        out["findings"] = finding_metrics(cases)
    return out


def _subjects(metrics: Mapping) -> dict[str, Mapping]:
    return {"consensus": metrics.get("consensus") or {}, **(metrics.get("models") or {})}


def metric_changes(previous: Mapping | None, current: Mapping) -> dict[str, dict[str, float]]:
    """Per subject and metric: current minus previous, where both are defined."""
    if not previous:
        return {}
    before = _subjects(previous)
    out: dict[str, dict[str, float]] = {}
    for name, now in _subjects(current).items():
        then = before.get(name)
        if not then:
            continue
        deltas = {
            m: round(now[m] - then[m], 6)
            for m in METRICS
            if isinstance(now.get(m), int | float) and isinstance(then.get(m), int | float)
        }
        if deltas:
            out[name] = deltas
    return out


def find_regressions(
    previous: Mapping | None,
    current: Mapping,
    margin: float,
    metrics: Sequence[str] = ("sensitivity", "specificity"),
) -> list[Regression]:
    """Sensitivity or specificity (of the consensus or any model in both evaluations) that
    dropped by more than ``margin`` since ``previous``."""
    if not previous:
        return []
    before = _subjects(previous)
    found = []
    for name, now in _subjects(current).items():
        then = before.get(name) or {}
        for m in metrics:
            a, b = then.get(m), now.get(m)
            if isinstance(a, int | float) and isinstance(b, int | float) and a - b > margin:
                found.append(Regression(name, m, float(a), float(b)))
    return found


def measure_reliability(
    cases: Sequence[dict], models: Sequence[str], *, source: str = ""
) -> dict[str, object]:
    """reliability.json: per model its confusion counts (scikit-learn), sensitivity and
    specificity smoothed by +½ per cell (so 0 and 1 stay finite), and the derived weight."""
    out: dict[str, dict] = {}
    for name in models:
        y, p, _ = predictions(cases, name)
        if not len(y):
            continue
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, p, labels=[0, 1]).ravel())
        sens = (tp + 0.5) / (tp + fn + 1)
        spec = (tn + 0.5) / (tn + fp + 1)
        out[name] = {
            "n": len(y),
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "sensitivity": round(sens, 6),
            "specificity": round(spec, 6),
            "weight": log_odds_weight(sens, spec),
        }
    return {
        "method": METHOD,
        "created_at": datetime.now(UTC).isoformat(),
        "source": source,
        "models": out,
    }
