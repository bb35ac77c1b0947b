"""Fine-tune datasets from annotated studies: parse annotations (CSV or JSONL), render each
annotated image exactly as screening does, build OpenAI chat fine-tuning examples whose answer
is a :class:`~tasks.core.schema.Reading`, split by patient (stratified, seeded) and describe it all
in a manifest."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from base64 import b64encode
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from sklearn.model_selection import StratifiedGroupKFold

from tasks.core.config import Language, Provider, Settings
from tasks.core.errors import AnnotationError, DatasetError, RadflowError
from tasks.core.redact import redact
from tasks.core.schema import Reading, Urgency
from tasks.core.words import NORMAL_DIAGNOSES, parse_abnormal
from tasks.finetune.checks import MAX_IMAGE_BYTES, MAX_IMAGES_PER_EXAMPLE, check_example
from tasks.imaging.preprocess import prepare_all
from tasks.ingest.context import clinical_context
from tasks.ingest.discover import read_header
from tasks.models.panel import user_text
from tasks.models.prompts import Prompt
from tasks.storage import ObjectRef, Store

__all__ = [
    "ANNOTATION_KEYS",
    "MIN_TRAIN_EXAMPLES",
    "Annotation",
    "AnnotationRow",
    "Example",
    "Rejected",
    "build_example",
    "parse_annotation",
    "parse_annotations",
    "split_by_patient",
    "to_jsonl",
]

logger = logging.getLogger(__name__)

MIN_TRAIN_EXAMPLES = 10
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .-]{0,39}")


class Rejected(BaseModel):
    """One annotation that was skipped: its line in the annotations file and why."""

    line: int
    image: str | None = None
    kind: str
    reason: str


@dataclass(frozen=True)
class Annotation:
    line: int
    images: tuple[str, ...]
    patient_id: str
    reading: Reading


@dataclass
class Example:
    """One chat fine-tuning example built from an annotation."""

    line: int
    patient_id: str
    abnormal: bool
    record: dict
    image_sha256: list[str] = field(default_factory=list)


def _items(value: object) -> list[str]:
    """A list from a JSON list or a ';'- or newline-separated string."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).replace("\n", ";").split(";") if s.strip()]


def _text(value: object) -> str:
    """A text field: None → "", a number → its text, surrounding spaces stripped."""
    return "" if value is None else str(value).strip()


def _abnormal(value: object) -> bool | None:
    try:
        return parse_abnormal(value)
    except ValueError as exc:
        raise ValueError(f'unknown label abnormal="{value}": {exc}') from None


def _blank_none(value: object) -> object:
    """A blank CSV cell (or JSON null) → None: not given."""
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _urgency(value: object) -> object:
    value = _blank_none(value)
    return value.strip().lower() if isinstance(value, str) else value


_Items = Annotated[list[str], BeforeValidator(_items)]
_Text = Annotated[str, BeforeValidator(_text)]
_Share = Annotated[float, Field(ge=0, le=1)]


class AnnotationRow(BaseModel):
    """One line of an annotations file, as given: the seed's keys (``image``: one key or a
    list, or ``;``-separated; ``findings`` and ``recommendation`` likewise), ``patient_id``
    and the labels ``abnormal`` (the words of :mod:`tasks.core.words`), ``urgency`` and
    ``diagnosis``. Any other key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: Annotated[
        tuple[str, ...],
        BeforeValidator(_items),
        Field(min_length=1, max_length=MAX_IMAGES_PER_EXAMPLE),
    ]
    patient_id: Annotated[_Text, Field(min_length=1)]
    # (checked in this order: the first bad field is the line's reason)
    urgency: Annotated[Urgency | None, BeforeValidator(_urgency)] = None
    abnormal: Annotated[bool | None, BeforeValidator(_abnormal)] = None
    diagnosis: _Text = ""
    image_description: _Text = ""
    confidence: Annotated[_Share | None, BeforeValidator(_blank_none)] = None
    findings: _Items = []
    recommendation: _Items = []

    @property
    def normal_diagnosis(self) -> bool:
        return self.diagnosis.lower() in NORMAL_DIAGNOSES

    @property
    def label(self) -> bool | None:
        """``abnormal``, else from ``urgency``, else from ``diagnosis`` (None: no label)."""
        if self.abnormal is not None:
            return self.abnormal
        if self.urgency is not None:
            return self.urgency is not Urgency.NORMAL
        return (not self.normal_diagnosis) if self.diagnosis else None

    @model_validator(mode="after")
    def _labels_agree(self) -> AnnotationRow:
        if self.label is None:
            raise ValueError('no label: give "abnormal", "urgency" or "diagnosis"')
        if self.urgency is not None and (self.urgency is Urgency.NORMAL) == self.label:
            raise ValueError(
                f"contradictory labels abnormal={self.label} and urgency={self.urgency}"
            )
        return self


ANNOTATION_KEYS = frozenset(AnnotationRow.model_fields)
# What a missing or out-of-bounds key means (pydantic's own wording otherwise).
_MISSING = {
    "image": 'no "image": name the DICOM key(s) relative to --images',
    "patient_id": 'no "patient_id": the split is by patient',
}


def _key_name(key: str, position: int) -> str:
    """An unknown key, quoted if it looks like a column name; else only its position and
    length: a file passed as annotations by mistake (a .env, a key file) has its first line
    as CSV header, and that line may be a secret."""
    if _COLUMN_NAME.fullmatch(key) and sum(c.isdigit() for c in key) < 6 and redact(key) == key:
        return repr(key)
    return f"key {position} ({len(key)} characters, not shown: not a column name)"


def _reason(exc: ValidationError, row: Mapping[str, object]) -> str:
    """One line for the first problem of ``row`` (every unknown key at once); values are
    quoted only for the label fields, whose values are words, never for unknown keys."""
    errors = exc.errors(include_url=False, include_input=False)
    keys = list(row)
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        names = [_key_name(k, keys.index(k) + 1) for k in unknown]
        return f"unknown key(s) {', '.join(names)}"
    error = errors[0]
    key = str(error["loc"][0]) if error["loc"] else ""
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), ValueError):  # ours: already one line with the reason
        return str(ctx["error"])
    if key in _MISSING and error["type"] in ("missing", "too_short", "string_too_short"):
        return _MISSING[key]
    if key == "image" and error["type"] == "too_long":
        return f"{ctx['actual_length']} images; at most {MAX_IMAGES_PER_EXAMPLE} per example"
    if key == "urgency":
        known = ", ".join(u.value for u in Urgency)
        return f'unknown label urgency="{row.get(key)}" (known: {known})'
    if key == "confidence":
        return f'confidence="{row.get(key)}" is not a number in [0, 1]'
    return f"{key}: {error['msg']}"


def parse_annotation(row: Mapping[str, object], line: int) -> Annotation:
    """Validate one annotation (:class:`AnnotationRow`); the label comes from ``abnormal``,
    else ``urgency``, else ``diagnosis`` (a normal diagnosis such as "normal" or "정상" →
    normal, any other → abnormal). A bad row is an AnnotationError with one line's reason."""
    try:
        given = AnnotationRow.model_validate(dict(row))
    except ValidationError as exc:
        raise AnnotationError(_reason(exc, row)) from None
    abnormal = bool(given.label)
    urgency = given.urgency or (Urgency.FOLLOW_UP if abnormal else Urgency.NORMAL)
    diagnosis = given.diagnosis
    reading = Reading(
        abnormal=abnormal,
        findings=given.findings,
        differentials=[diagnosis] if diagnosis and abnormal and not given.normal_diagnosis else [],
        urgency=urgency.value,
        recommended_exams=given.recommendation,
        rationale=given.image_description or diagnosis,
    )
    return Annotation(line, given.image, given.patient_id, reading)


def _rows(data: bytes, name: str) -> Iterable[tuple[int, object]]:
    """(line number, raw row) of a CSV (header on line 1) or JSONL file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AnnotationError(
            f'"{name}" is not UTF-8 text (invalid byte at offset {exc.start})'
        ) from None
    if name.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise AnnotationError(f'"{name}" has no header row')
        start = 2
        for row in reader:
            yield start, {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1
    elif name.lower().endswith((".jsonl", ".json", ".ndjson")):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield number, line
    else:
        raise AnnotationError(f'"{name}": annotations must be .csv or .jsonl')


def parse_annotations(data: bytes, name: str) -> tuple[list[Annotation], list[Rejected]]:
    """Every valid annotation of the file and a :class:`Rejected` per bad line."""
    good: list[Annotation] = []
    bad: list[Rejected] = []
    for line, raw in _rows(data, name):
        image = None
        try:
            row = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(row, dict):
                raise AnnotationError("a JSONL line must be a JSON object")
            image = ";".join(_items(row.get("image"))) or None
            good.append(parse_annotation(row, line))
        except json.JSONDecodeError as exc:
            bad.append(Rejected(line=line, kind="AnnotationError", reason=f"invalid JSON: {exc}"))
        except RadflowError as exc:
            bad.append(Rejected(line=line, image=image, kind=exc.kind, reason=exc.args[0]))
    return good, bad


def _rgb_data_url(png: bytes, source: str) -> tuple[str, str]:
    """(data URL, sha256) of the image in RGB mode: PNG, or JPEG if the PNG exceeds 10 MB."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    for fmt, media, options in (
        ("PNG", "image/png", {"compress_level": 6}),
        ("JPEG", "image/jpeg", {"quality": 92}),
    ):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        data = buf.getvalue()
        if len(data) <= MAX_IMAGE_BYTES:
            url = f"data:{media};base64," + b64encode(data).decode()
            return url, hashlib.sha256(data).hexdigest()
    raise AnnotationError(f'"{source}" renders larger than 10 MB even as JPEG; lower max_edge')


def build_example(
    annotation: Annotation, store: Store, settings: Settings, prompt: Prompt
) -> Example:
    """The chat example of one annotation: the screening prompt, the de-identified context
    and the key images (rendered as screening renders them), answered by the annotation's
    reading. Images are what screening sends an OpenAI model (its provider-sized PNG, as RGB).
    Nothing from the DICOM header but :func:`clinical_context` reaches the text."""
    parts: list[dict] = []
    headers: list[dict[str, str]] = []
    hashes: list[str] = []
    for key in annotation.images:
        if not store.exists(key):
            raise AnnotationError(f'image "{key}" not found under "{store.uri}"')
        data = store.read_bytes(key)
        ref = ObjectRef(f"{store.uri.rstrip('/')}/{key}", key, len(data), "")
        headers.append(read_header(store, ref).header)
        images = prepare_all(io.BytesIO(data), settings.preprocess, ref.uri, [Provider.OPENAI])
        for image in images:  # one, or several with preprocess.key_images spaced:N
            url, digest = _rgb_data_url(image.for_provider(Provider.OPENAI), ref.uri)
            parts.append({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
            hashes.append(digest)
    if len(parts) > MAX_IMAGES_PER_EXAMPLE:
        raise AnnotationError(
            f"{len(parts)} key images; at most {MAX_IMAGES_PER_EXAMPLE} per example",
            hint="name fewer images or lower preprocess.key_images",
        )
    text = user_text(clinical_context(headers), len(parts), Language(settings.language))
    record = {
        "messages": [
            {"role": "system", "content": prompt.text},
            {"role": "user", "content": [{"type": "text", "text": text}, *parts]},
            {"role": "assistant", "content": annotation.reading.model_dump_json()},
        ]
    }
    errors, _, _ = check_example(record)
    if errors:
        raise DatasetError(f"built example fails the format checks: {', '.join(errors)}")
    return Example(
        annotation.line, annotation.patient_id, annotation.reading.abnormal, record, hashes
    )


def split_by_patient(
    labels: list[bool], groups: list[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, validation) indices: one fold of scikit-learn's StratifiedGroupKFold with
    ``round(1 / val_fraction)`` folds, so no patient is in both and the abnormal share is
    kept as close as the patients allow. ``val_fraction`` 0 → everything in train."""
    if not 0 <= val_fraction <= 0.5:
        raise DatasetError(f"--val-fraction {val_fraction} must be in [0, 0.5]")
    everything = list(range(len(labels)))
    if val_fraction == 0:
        return everything, []
    folds = max(2, round(1 / val_fraction))
    patients = len(set(groups))
    if patients < folds:
        raise DatasetError(
            f"{patients} patient(s) cannot be split with --val-fraction {val_fraction:g}: "
            f"need at least {folds}",
            hint="add annotated patients or lower --val-fraction (0 = no validation file)",
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    y = np.asarray(labels, dtype=int)
    train, validation = next(splitter.split(np.zeros((len(labels), 1)), y, groups))
    return sorted(train.tolist()), sorted(validation.tolist())


def to_jsonl(examples: Iterable[Example]) -> bytes:
    return b"".join(
        json.dumps(e.record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for e in examples
    )
