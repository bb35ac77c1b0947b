"""The review page of a flagged study (a Markdown artifact of its review run): the key images
the models saw, inline, and the consensus next to each model's reading; the short text above
the form; and the verdict once it is submitted."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from tasks.core.schema import ImageInfo, MergedItem, ModelReading, Report, ReviewState
from tasks.core.words import short_result
from tasks.reports.markdown import image_name
from tasks.reports.write import report_key
from tasks.review.verdicts import Verdict
from tasks.storage import Store

__all__ = [
    "PageImage",
    "form_description",
    "page_images",
    "page_key",
    "render_page",
    "verdict_markdown",
]

logger = logging.getLogger(__name__)

DISCLAIMER = "AI-generated preliminary screening for review by a radiologist, not a diagnosis."
SIMULATED = (
    "> **SIMULATED** — these readings come from radflow's simulator, a test double, not from a "
    "model. They are not a medical opinion."
)
_CELL_LIMIT = 600
FORM_IMAGE_EDGE = 256  # px, the key image above the form


@dataclass(frozen=True)
class PageImage:
    info: ImageInfo
    png: bytes | None  # None: the file is missing under DEST
    width: int = 0
    height: int = 0

    def data_url(self) -> str:
        return _data_url(self.png or b"")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def page_key(study: str) -> str:
    """The page artifact's key (Prefect: lowercase letters, digits and dashes)."""
    return f"review-{study}"


def _shrink(png: bytes, edge: int) -> tuple[bytes, int, int]:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        if max(im.size) > edge:
            im.thumbnail((edge, edge), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.save(out, format="PNG", optimize=True)
        return out.getvalue(), im.width, im.height


def page_images(store: Store, report: Report, edge: int) -> list[PageImage]:
    """The report's key images (``images/<sha prefix>.png`` beside report.json), their long
    edge brought down to ``edge`` px so the page stays small in the Prefect database."""
    out = []
    for info in report.images:
        key = report_key(report.study_instance_uid, image_name(info.sha256))
        if not store.exists(key):  # logged by image, not by study (no UID in logs)
            logger.warning("key image %s is missing under %s", image_name(info.sha256), store.uri)
            out.append(PageImage(info, None))
            continue
        png, width, height = _shrink(store.read_bytes(key), edge)
        out.append(PageImage(info, png, width, height))
    return out


def _cell(text: str | None) -> str:
    """Model output is untrusted text: no HTML, no table breaks, bounded length."""
    if not text:
        return "—"
    text = " ".join(str(text).split())
    if len(text) > _CELL_LIMIT:
        text = text[: _CELL_LIMIT - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


def _items(items: Sequence[str | MergedItem]) -> str:
    texts = [i.text if isinstance(i, MergedItem) else i for i in items]
    return "; ".join(_cell(t) for t in texts) if texts else "—"


def _yes_no(abnormal: bool | None) -> str:
    text = short_result(abnormal)
    return f"**{text}**" if abnormal else text


def _reading_cells(r: ModelReading) -> list[str]:
    if not r.ok:
        failed = f"failed: {_cell(r.error)}"
        return [failed, "—", "—", "—", "—", "—", _cell(r.response_model or r.model_id)]
    answered = (r.response_model or r.model_id) + (" (simulated)" if r.simulated else "")
    return [
        _yes_no(r.abnormal),
        r.urgency.value if r.urgency else "—",
        _items(r.findings),
        _items(r.differentials),
        _items(r.recommended_exams),
        _cell(r.rationale),
        _cell(answered),
    ]


def _side_by_side(report: Report) -> list[str]:
    c = report.consensus
    rows = ["result", "urgency", "findings", "differentials", "recommended exams"]
    rows += ["rationale", "answered by"]
    score = f" (score {c.score:.2f}, agreement {c.agreement:.0%})" if c.score is not None else ""
    columns = [
        [
            _yes_no(c.abnormal) + score,
            c.urgency.value if c.urgency else "—",
            _items(c.findings),
            _items(c.differentials),
            _items(c.recommended_exams),
            "—",
            _cell(c.rule),
        ]
    ]
    columns += [_reading_cells(r) for r in report.readings]
    header = ["", "**consensus**", *(_cell(r.model) for r in report.readings)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, name in enumerate(rows):
        lines.append(f"| {name} | " + " | ".join(col[i] for col in columns) + " |")
    return lines


def _context(report: Report) -> str:
    shown = ", ".join(f"{k.replace('_', ' ')} {_cell(v)}" for k, v in report.context.items())
    return shown or "none"


def _where(report: Report, study: str, dest: str, show_uid: bool) -> list[str]:
    """Where the study is: its UID and report (``privacy.log_uids: plain``), or its review id
    and how to map it back (``hash``: Prefect shows no UID)."""
    version = f"version {report.created_at.isoformat()}"
    root = _cell(dest.rstrip("/"))
    if show_uid:
        return [
            f"- **Study:** `{report.study_instance_uid}`",
            f"- **Report:** report.md in the study's folder under {root}/studies/ ({version})",
        ]
    return [
        f"- **Study:** review id `{study}`; its StudyInstanceUID: `radflow lookup {root} {study}`",
        f"- **Report:** report.md in the study's folder under {root}/studies/ ({version})",
    ]


def render_page(
    report: Report,
    images: Sequence[PageImage],
    study: str,
    dest: str,
    state: ReviewState,
    *,
    show_uid: bool = False,
) -> str:
    """The review page: why the study is flagged, the key images inline (data URLs: they show
    in the UI wherever DEST is), the readings side by side and how to answer. ``study`` is the
    review id; the UID is shown only with ``show_uid``."""
    c = report.consensus
    modality = report.context.get("modality", "study")
    lines = [f"# Review of {_cell(modality)} study {study} (request {state.attempt})", ""]
    if report.simulated:
        lines += [SIMULATED, ""]
    lines += [
        DISCLAIMER + " Your verdict is stored as the study's review.json and becomes its "
        "label for evaluation and fine-tuning.",
        "",
        f"- **Why flagged:** {'; '.join(_cell(r) for r in c.review_reasons) or '—'}",
        *_where(report, study, dest, show_uid),
        f"- **Context sent to the models:** {_context(report)}",
        "",
        f"## Key images the models saw ({len(images)})",
        "",
    ]
    for n, image in enumerate(images, 1):
        info = image.info
        caption = f"image {n}: {info.modality or modality}, window {_cell(info.window)}"
        caption += f", {info.width}×{info.height} px" + (
            f", frame {info.frame}" if info.frame is not None else ""
        )
        if image.png is None:
            lines += [f"*{caption}: the file is missing under DEST*", ""]
            continue
        lines += [f"![{caption}]({image.data_url()})", "", f"*{caption}*", ""]
    lines += ["## Readings side by side", "", *_side_by_side(report), ""]
    lines += [
        "## Your verdict",
        "",
        "Open this run's menu (⋮, top right) → **Resume**, and fill in the form: abnormal "
        "(yes/no), urgency, findings, your initials, or tick *not assessable*. The run then "
        "stores the verdict and completes.",
    ]
    if state.expires_at:
        lines.append(f"Unanswered, this review expires at {state.expires_at:%Y-%m-%d %H:%M} UTC.")
    return "\n".join(lines) + "\n"


def form_description(report: Report, images: Sequence[PageImage], study: str) -> str:
    """Shown above the form: the AI's call, why it is flagged, the first key image (small)."""
    c = report.consensus
    lines = []
    if report.simulated:
        lines += [SIMULATED, ""]
    lines += [
        f"**AI consensus:** {_yes_no(c.abnormal)}, urgency "
        f"{c.urgency.value if c.urgency else '—'}, agreement {c.agreement:.0%}. "
        f"**Flagged:** {'; '.join(_cell(r) for r in c.review_reasons) or '—'}.",
        "",
    ]
    shown = next((i for i in images if i.png is not None), None)
    if shown is not None:  # small: the form should stay in view
        png, _, _ = _shrink(shown.png, FORM_IMAGE_EDGE)
        lines += [f"![key image 1]({_data_url(png)})", ""]
    lines.append(
        f"All key images and each model's reading: Artifacts tab, `{page_key(study)}`. "
        + DISCLAIMER
    )
    return "\n".join(lines)


def verdict_markdown(verdict: Verdict, study: str, *, show_uid: bool = False) -> str:
    """The short artifact a completed review run leaves: the verdict next to the AI's call."""
    if verdict.not_assessable:
        said = "**not assessable** (no label is made)"
    else:
        said = f"{_yes_no(verdict.abnormal)}, urgency {verdict.urgency.value}"
    ai = verdict.report
    agree = {True: "agrees", False: "**disagrees**", None: "cannot be compared"}
    return (
        "\n".join(
            [
                f"# Verdict by {_cell(verdict.reviewer)} on study {study}",
                "",
                f"- reviewer: {said}; findings: {_items(verdict.findings)}",
                f"- AI consensus: {_yes_no(ai.abnormal)}, urgency "
                f"{ai.urgency.value if ai.urgency else '—'} — the reviewer "
                f"{agree[verdict.agrees_with_consensus]}",
                f"- reviewed at {verdict.reviewed_at.isoformat()}; report version "
                f"{ai.created_at.isoformat()}",
                f"- stored as `{ai.key.replace('report.json', 'review.json')}`"
                if show_uid
                else f"- stored as review.json in the folder of study {study} (`radflow lookup`)",
            ]
        )
        + "\n"
    )
