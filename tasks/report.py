"""Write what a study's reading produced: report.json, report.md (ko/en) and the key images."""

from __future__ import annotations

import hashlib
import logging

from tasks.config import Language
from tasks.schema import ErrorRecord, Report, RunSummary
from tasks.storage import Store

__all__ = [
    "error_key",
    "render_markdown",
    "report_key",
    "write_error",
    "write_report",
    "write_run_summary",
]

logger = logging.getLogger(__name__)

_TEXT = {
    Language.EN: {
        "title": "Screening report",
        "simulated": "**SIMULATED** — these readings come from radflow's offline simulator, a "
        "test double. They are not a medical opinion.",
        "disclaimer": "AI-generated preliminary screening for review by a radiologist. "
        "Not a diagnosis.",
        "status": "Status",
        "result": "Consensus",
        "abnormal": "abnormal",
        "normal": "no abnormality",
        "unknown": "no reading",
        "urgency": "Urgency",
        "agreement": "Agreement",
        "review": "Needs review",
        "yes": "yes",
        "no": "no",
        "findings": "Findings",
        "differentials": "Differentials",
        "exams": "Recommended exams",
        "none": "none",
        "models": "Readings per model",
        "table": "| model | result | urgency | tokens in/out | cost (USD) | latency (ms) |",
        "images": "Images read",
        "cost": "Cost",
        "context": "Context sent to the models",
        "urgencies": {"immediate": "immediate", "follow_up": "follow-up", "normal": "normal"},
    },
    Language.KO: {
        "title": "선별 판독 보고서",
        "simulated": "**시뮬레이션** — 이 판독은 radflow 오프라인 시뮬레이터(테스트용 대역)가 "
        "만든 것입니다. 의학적 소견이 아닙니다.",
        "disclaimer": "AI가 생성한 예비 선별 결과로, 영상의학과 전문의의 검토가 필요합니다. "
        "진단이 아닙니다.",
        "status": "상태",
        "result": "합의 결과",
        "abnormal": "이상 소견 있음",
        "normal": "이상 소견 없음",
        "unknown": "판독 없음",
        "urgency": "긴급도",
        "agreement": "일치도",
        "review": "검토 필요",
        "yes": "예",
        "no": "아니오",
        "findings": "소견",
        "differentials": "감별 진단",
        "exams": "권장 검사",
        "none": "없음",
        "models": "모델별 판독",
        "table": "| 모델 | 결과 | 긴급도 | 토큰 입력/출력 | 비용 (USD) | 지연 (ms) |",
        "images": "판독한 영상",
        "cost": "비용",
        "context": "모델에 보낸 임상 정보",
        "urgencies": {"immediate": "즉시 치료", "follow_up": "추적 검사", "normal": "정상"},
    },
}


def report_key(uid: str, name: str = "report.json") -> str:
    return f"studies/{uid}/{name}"


def error_key(record: ErrorRecord) -> str:
    """One record per input: the id is a hash of the source, so a rerun overwrites, never adds."""
    return f"errors/{hashlib.sha256(record.source.encode()).hexdigest()[:20]}.json"


def image_name(sha256: str) -> str:
    return f"images/{sha256[:16]}.png"


def _items(items, none: str) -> list[str]:
    if not items:
        return [f"- {none}"]
    return [f"- {i.text} ({', '.join(i.models)})" for i in items]


def render_markdown(report: Report) -> str:
    """report.md in the report's language: consensus, findings with supporting models, the
    per-model table, cost, the key images, and the AI disclaimer."""
    t = _TEXT[Language(report.language)]
    c = report.consensus
    result = t["unknown"] if c.abnormal is None else t["abnormal" if c.abnormal else "normal"]
    urgency = t["urgencies"][c.urgency.value] if c.urgency else t["unknown"]
    lines = [f"# {t['title']}: {report.study_instance_uid}", ""]
    if report.simulated:
        lines += [f"> {t['simulated']}", ""]
    lines += [
        f"> {t['disclaimer']}",
        "",
        f"- {t['status']}: {report.status}",
        f"- {t['result']}: **{result}**"
        + (f" (score {c.score:.2f})" if c.score is not None else ""),
        f"- {t['urgency']}: **{urgency}**",
        f"- {t['agreement']}: {c.agreement:.0%}",
        f"- {t['review']}: {t['yes'] if c.needs_review else t['no']}"
        + (f" — {'; '.join(c.review_reasons)}" if c.review_reasons else ""),
        f"- {t['cost']}: ${report.cost_usd:.4f}",
        "",
        f"## {t['findings']}",
        *_items(c.findings, t["none"]),
        "",
        f"## {t['differentials']}",
        *_items(c.differentials, t["none"]),
        "",
        f"## {t['exams']}",
        *_items(c.recommended_exams, t["none"]),
        "",
        f"## {t['models']}",
        "",
        t["table"],
        "|---|---|---|---|---|---|",
    ]
    for r in report.readings:
        if r.ok:
            res = t["abnormal" if r.abnormal else "normal"]
        else:
            res = f"{t['unknown']}: {r.error}".replace("|", "/")
        urg = t["urgencies"][r.urgency.value] if r.urgency else "—"
        lines.append(
            f"| {r.model} | {res} | {urg} | {r.input_tokens}/{r.output_tokens} "
            f"| {r.cost_usd:.4f} | {r.latency_ms:.0f} |"
        )
    lines += [""]
    for r in report.readings:
        if r.ok and r.rationale:
            lines.append(f"- **{r.model}**: {r.rationale}")
    lines += ["", f"## {t['context']}", ""]
    ctx = ", ".join(f"{k}={v}" for k, v in sorted(report.context.items()))
    lines += [ctx or t["none"], "", f"## {t['images']}", ""]
    for img in report.images:
        lines += [
            f"![{img.sop_instance_uid}]({image_name(img.sha256)})",
            f"`{img.modality or ''}` {img.width}×{img.height}, {img.window}, sha256 "
            f"`{img.sha256[:16]}`",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_report(store: Store, report: Report, pngs: dict[str, bytes]) -> None:
    """Key images first, report.md, then report.json last: report.json marks a finished study."""
    uid = report.study_instance_uid
    for sha, png in pngs.items():
        store.write_bytes(report_key(uid, image_name(sha)), png, "image/png")
    store.write_bytes(
        report_key(uid, "report.md"),
        render_markdown(report).encode(),
        "text/markdown; charset=utf-8",
    )
    store.write_bytes(
        report_key(uid), report.model_dump_json(indent=2).encode(), "application/json"
    )


def write_error(store: Store, record: ErrorRecord) -> None:
    store.write_bytes(
        error_key(record), record.model_dump_json(indent=2).encode(), "application/json"
    )


def write_run_summary(store: Store, summary: RunSummary) -> str:
    key = f"runs/{summary.run_id}.json"
    store.write_bytes(key, summary.model_dump_json(indent=2).encode(), "application/json")
    return key
