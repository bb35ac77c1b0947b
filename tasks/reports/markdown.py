"""report.md: the study's report in its language (ko/en) for the reviewing radiologist; the
result and urgency words come from tasks.core.words."""

from __future__ import annotations

from collections.abc import Sequence

from tasks.core.config import Language
from tasks.core.schema import MergedItem, Report, ReviewReason
from tasks.core.words import result, urgency_word, yes_no

__all__ = ["image_name", "render_markdown", "review_reason"]

_TEXT = {
    Language.EN: {
        "title": "Screening report",
        "simulated": "**SIMULATED** — these readings come from radflow's offline simulator, a "
        "test double. They are not a medical opinion.",
        "disclaimer": "AI-generated preliminary screening for review by a radiologist. "
        "Not a diagnosis.",
        "status": "Status",
        "result": "Consensus",
        "urgency": "Urgency",
        "agreement": "Agreement",
        "review": "Needs review",
        "findings": "Findings",
        "differentials": "Differentials",
        "exams": "Recommended exams",
        "none": "none",
        "models": "Readings per model",
        "table": "| model | result | urgency | tokens in/out | cost (USD) | latency (ms) |",
        "images": "Images read",
        "cost": "Cost",
        "context": "Context sent to the models",
        "score": "score",
        "impression": "Impression",
        "model_written": "Written by the model {model} ({model_id}) from the structured "
        "readings only; it does not change the consensus above.",
        "impression_failed": "The impression could not be written ({model}: {error}).",
        "written": "Written by radflow {version} in run {run} at {time}.",
        "reasons": {
            "model_failed": "no reading from {models}",
            "no_reading": "no model produced a reading",
            "disagree": "models disagree on abnormal",
            "immediate": "{models} rate(s) it immediate",
            "low_agreement": "agreement {value:.0%} is below {threshold:.0%}",
        },
    },
    Language.KO: {
        "title": "선별 판독 보고서",
        "simulated": "**시뮬레이션** — 이 판독은 radflow 오프라인 시뮬레이터(테스트용 대역)가 "
        "만든 것입니다. 의학적 소견이 아닙니다.",
        "disclaimer": "AI가 생성한 예비 선별 결과로, 영상의학과 전문의의 검토가 필요합니다. "
        "진단이 아닙니다.",
        "status": "상태",
        "result": "합의 결과",
        "urgency": "긴급도",
        "agreement": "일치도",
        "review": "검토 필요",
        "findings": "소견",
        "differentials": "감별 진단",
        "exams": "권장 검사",
        "none": "없음",
        "models": "모델별 판독",
        "table": "| 모델 | 결과 | 긴급도 | 토큰 입력/출력 | 비용 (USD) | 지연 (ms) |",
        "images": "판독한 영상",
        "cost": "비용",
        "context": "모델에 보낸 임상 정보",
        "score": "점수",
        "impression": "인상",
        "model_written": "모델 {model} ({model_id})이(가) 구조화된 판독만으로 작성한 글이며, "
        "위의 합의 결과를 바꾸지 않습니다.",
        "impression_failed": "인상을 작성하지 못했습니다 ({model}: {error}).",
        "written": "radflow {version}, 실행 {run}, {time} 작성.",
        "reasons": {
            "model_failed": "{models}의 판독 없음",
            "no_reading": "판독을 낸 모델 없음",
            "disagree": "모델 간 이상 여부 불일치",
            "immediate": "{models}이(가) 즉시 치료로 판정",
            "low_agreement": "일치도 {value:.0%}가 기준 {threshold:.0%}보다 낮음",
        },
    },
}


def image_name(sha256: str) -> str:
    """Where a key image is saved, relative to the study's folder."""
    return f"images/{sha256[:16]}.png"


def review_reason(reason: ReviewReason, language: Language | str) -> str:
    """One review reason in ``language``."""
    template = _TEXT[Language(language)]["reasons"][reason.code.value]
    return template.format(
        models=", ".join(reason.models),
        value=reason.value or 0.0,
        threshold=reason.threshold or 0.0,
    )


def _items(items: Sequence[MergedItem], none: str) -> list[str]:
    if not items:
        return [f"- {none}"]
    return [f"- {i.text} ({', '.join(i.models)})" for i in items]


def _impression(report: Report, t: dict) -> list[str]:
    imp = report.impression
    if imp is None:
        return []
    if not imp.ok:
        note = t["impression_failed"].format(model=imp.model, error=imp.error)
        return [f"## {t['impression']}", "", f"_{note}_", ""]
    note = t["model_written"].format(model=imp.model, model_id=imp.model_id)
    return [f"## {t['impression']}", "", f"> {note}", "", imp.text, ""]


def render_markdown(report: Report) -> str:
    """report.md in the report's language: consensus, findings with supporting models, the
    per-model table, cost, the key images, and the AI disclaimer."""
    language = Language(report.language)
    t = _TEXT[language]
    c = report.consensus
    none = result(None, language)
    urgency = urgency_word(c.urgency, language) if c.urgency else none
    reasons = [review_reason(d, report.language) for d in c.review_details]
    lines = [f"# {t['title']}: {report.study_instance_uid}", ""]
    if report.simulated:
        lines += [f"> {t['simulated']}", ""]
    lines += [
        f"> {t['disclaimer']}",
        "",
        f"- {t['status']}: {report.status}",
        f"- {t['result']}: **{result(c.abnormal, language)}**"
        + (f" ({t['score']} {c.score:.2f})" if c.score is not None else ""),
        f"- {t['urgency']}: **{urgency}**",
        f"- {t['agreement']}: {c.agreement:.0%}",
        f"- {t['review']}: {yes_no(c.needs_review, language)}"
        + (f" — {'; '.join(reasons)}" if reasons else ""),
        f"- {t['cost']}: ${report.cost_usd:.4f}",
        "",
        *_impression(report, t),
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
        failed = f"{none}: {r.error}".replace("|", "/")
        res = result(bool(r.abnormal), language) if r.ok else failed
        urg = urgency_word(r.urgency, language) if r.urgency else "—"
        lines.append(
            f"| {r.model} | {res} | {urg} | {r.input_tokens}/{r.output_tokens} "
            f"| {'?' if r.cost_usd is None else f'{r.cost_usd:.4f}'} | {r.latency_ms:.0f} |"
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
    written = t["written"].format(
        version=report.radflow_version,
        run=report.run_id or "-",
        time=report.created_at.isoformat(timespec="seconds"),
    )
    lines.append(f"_{written}_")
    return "\n".join(lines) + "\n"
