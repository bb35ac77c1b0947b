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

import numpy as np
from PIL import Image
from pydantic import BaseModel
from sklearn.model_selection import StratifiedGroupKFold

from tasks.core.config import Language, Provider, Settings
from tasks.core.errors import AnnotationError, DatasetError, RadflowError
from tasks.core.redact import redact
from tasks.core.schema import Reading, Urgency
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
SEED_KEYS = ("image", "image_description", "diagnosis", "confidence", "findings", "recommendation")
ANNOTATION_KEYS = frozenset((*SEED_KEYS, "patient_id", "abnormal", "urgency"))
_TRUE = {"1", "true", "t", "yes", "y", "abnormal"}
_FALSE = {"0", "false", "f", "no", "n", "normal"}
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .-]{0,39}")
_NORMAL_DIAGNOSES = {"normal", "정상", "no finding", "no findings", "no abnormality", "none"}


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


def _bool(value: object) -> bool | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AnnotationError(f'unknown label abnormal="{value}" (expected 0/1, true/false, yes/no)')


def _key_name(key: str, position: int) -> str:
    """An unknown key, quoted if it looks like a column name; else only its position and
    length: a file passed as annotations by mistake (a .env, a key file) has its first line
    as CSV header, and that line may be a secret."""
    if _COLUMN_NAME.fullmatch(key) and sum(c.isdigit() for c in key) < 6 and redact(key) == key:
        return repr(key)
    return f"key {position} ({len(key)} characters, not shown: not a column name)"


def parse_annotation(row: Mapping[str, object], line: int) -> Annotation:
    """Validate one annotation; the label comes from ``abnormal``, else ``urgency``, else
    ``diagnosis`` (a normal diagnosis such as "normal" or "정상" → normal, any other → abnormal)."""
    unknown = [_key_name(k, i) for i, k in enumerate(row, 1) if k not in ANNOTATION_KEYS]
    if unknown:
        raise AnnotationError(f"unknown key(s) {', '.join(unknown)}")
    images = tuple(_items(row.get("image")))
    if not images:
        raise AnnotationError('no "image": name the DICOM key(s) relative to --images')
    if len(images) > MAX_IMAGES_PER_EXAMPLE:
        raise AnnotationError(f"{len(images)} images; at most {MAX_IMAGES_PER_EXAMPLE} per example")
    patient = str(row.get("patient_id") or "").strip()
    if not patient:
        raise AnnotationError('no "patient_id": the split is by patient')
    urgency_text = str(row.get("urgency") or "").strip().lower()
    try:
        urgency = Urgency(urgency_text) if urgency_text else None
    except ValueError:
        known = ", ".join(u.value for u in Urgency)
        raise AnnotationError(f'unknown label urgency="{urgency_text}" (known: {known})') from None
    diagnosis = str(row.get("diagnosis") or "").strip()
    abnormal = _bool(row.get("abnormal"))
    if abnormal is None and urgency is not None:
        abnormal = urgency is not Urgency.NORMAL
    if abnormal is None and diagnosis:
        abnormal = diagnosis.lower() not in _NORMAL_DIAGNOSES
    if abnormal is None:
        raise AnnotationError('no label: give "abnormal", "urgency" or "diagnosis"')
    if urgency is None:
        urgency = Urgency.FOLLOW_UP if abnormal else Urgency.NORMAL
    if (urgency is Urgency.NORMAL) == abnormal:
        raise AnnotationError(f"contradictory labels abnormal={abnormal} and urgency={urgency}")
    confidence = row.get("confidence")
    if confidence not in (None, ""):
        try:
            ok = 0.0 <= float(confidence) <= 1.0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise AnnotationError(f'confidence="{confidence}" is not a number in [0, 1]')
    normal_diagnosis = diagnosis.lower() in _NORMAL_DIAGNOSES
    reading = Reading(
        abnormal=abnormal,
        findings=_items(row.get("findings")),
        differentials=[diagnosis] if diagnosis and abnormal and not normal_diagnosis else [],
        urgency=urgency.value,
        recommended_exams=_items(row.get("recommendation")),
        rationale=str(row.get("image_description") or diagnosis).strip(),
    )
    return Annotation(line, images, patient, reading)


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
