"""The stages of the fine-tune dataset flow: read annotations, build examples, split and check
them, write train.jsonl / validation.jsonl / rejected.jsonl / manifest.json to DEST."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks
from tasks.core.config import Settings, StorageConfig
from tasks.core.errors import DatasetError, RadflowError
from tasks.finetune.checks import check_examples, estimate_cost
from tasks.finetune.examples import (
    MIN_TRAIN_EXAMPLES,
    Annotation,
    Example,
    Rejected,
    build_example,
    parse_annotations,
    split_by_patient,
    to_jsonl,
)
from tasks.models.prompts import load_prompt
from tasks.storage import Store, open_store, split_uri

__all__ = [
    "Dataset",
    "assemble",
    "build_examples",
    "manifest_markdown",
    "read_annotations",
    "write_dataset",
    "write_rejected",
]

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    train: list[Example]
    validation: list[Example]
    rejected: list[Rejected]
    manifest: dict


@task(name="read-annotations", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def read_annotations(
    uri: str, storage: StorageConfig | None = None
) -> tuple[list[Annotation], list[Rejected], str]:
    """Parse the annotations file at ``uri`` (local or S3); returns its sha256 too."""
    folder, key = split_uri(uri)
    store = open_store(folder, storage)
    if not store.exists(key):
        raise DatasetError(f'annotations file "{uri}" does not exist')
    data = store.read_bytes(key)
    good, bad = parse_annotations(data, key)
    get_run_logger().info("%s: %d annotations, %d rejected", uri, len(good), len(bad))
    return good, bad, hashlib.sha256(data).hexdigest()


@task(name="build-examples", timeout_seconds=7200, cache_policy=NO_CACHE)
def build_examples(
    annotations: list[Annotation], images: str, settings: Settings
) -> tuple[list[Example], list[Rejected]]:
    """Render and assemble every annotation; a bad image is a :class:`Rejected` with its line."""
    store = open_store(images, settings.storage)
    prompt = load_prompt(settings.language)
    examples: list[Example] = []
    rejected: list[Rejected] = []
    for annotation in annotations:
        try:
            examples.append(build_example(annotation, store, settings, prompt))
        except RadflowError as exc:
            rejected.append(
                Rejected(
                    line=annotation.line,
                    image=";".join(annotation.images),
                    kind=exc.kind,
                    reason=exc.args[0],
                )
            )
    get_run_logger().info("built %d examples, %d rejected", len(examples), len(rejected))
    return examples, rejected


def _split_summary(examples: list[Example], data: bytes, checks: dict) -> dict:
    return {
        "examples": len(examples),
        "patients": sorted({e.patient_id for e in examples}),
        "abnormal": sum(e.abnormal for e in examples),
        "normal": sum(not e.abnormal for e in examples),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "lines": [e.line for e in examples],
        "image_sha256": [h for e in examples for h in e.image_sha256],
        "checks": checks,
    }


def assemble(
    examples: list[Example],
    rejected: list[Rejected],
    *,
    settings: Settings,
    source: dict,
    val_fraction: float,
    seed: int,
    token_limit: int,
    price_per_mtok: float,
    epochs: int | None,
) -> Dataset:
    """Drop examples over the token limit, split by patient, check both splits and describe
    them in the manifest. Raises :class:`DatasetError` below ``MIN_TRAIN_EXAMPLES``."""
    rejected = list(rejected)
    report = check_examples((e.record for e in examples), token_limit)
    keep = []
    for example, tokens in zip(examples, report.tokens, strict=True):
        if tokens > token_limit:
            reason = f"{tokens} tokens exceed the per-example limit of {token_limit}"
            rejected.append(Rejected(line=example.line, kind="DatasetError", reason=reason))
        else:
            keep.append(example)
    rejected.sort(key=lambda r: r.line)
    if len(keep) < MIN_TRAIN_EXAMPLES:
        raise DatasetError(
            f"only {len(keep)} valid example(s) of {len(keep) + len(rejected)} annotations; "
            f"at least {MIN_TRAIN_EXAMPLES} training examples are needed"
        )
    train_idx, val_idx = split_by_patient(
        [e.abnormal for e in keep], [e.patient_id for e in keep], val_fraction, seed
    )
    train, validation = [keep[i] for i in train_idx], [keep[i] for i in val_idx]
    if len(train) < MIN_TRAIN_EXAMPLES:
        raise DatasetError(
            f"only {len(train)} training example(s) after the patient split; "
            f"at least {MIN_TRAIN_EXAMPLES} are needed",
            hint="add annotated patients or lower --val-fraction",
        )
    checked = {}
    for name, part in (("train", train), ("validation", validation)):
        result = check_examples((e.record for e in part), token_limit)
        if not result.ok:  # examples were checked one by one already: this is a bug
            raise DatasetError(f"{name} split fails the checks: {result.summary()}")
        checked[name] = result
    estimate = estimate_cost(checked["train"].tokens, token_limit, price_per_mtok, epochs)
    manifest = {
        "schema_version": "1",
        "radflow_version": tasks.__version__,
        "created_at": datetime.now(UTC).isoformat(),
        "format": "openai-chat-finetune-v1 (images as data URLs)",
        "source": source,
        "language": settings.language.value,
        "prompt_version": load_prompt(settings.language).version,
        "preprocess": settings.preprocess.model_dump(mode="json"),
        "split": {
            "method": "sklearn StratifiedGroupKFold (groups: patient_id, stratified: abnormal)",
            "val_fraction": val_fraction,
            "seed": seed,
        },
        "train": _split_summary(train, to_jsonl(train), checked["train"].summary()),
        "validation": _split_summary(
            validation, to_jsonl(validation), checked["validation"].summary()
        ),
        "rejected": {"count": len(rejected), "file": "rejected.jsonl"},
        "estimate": {
            "tokenizer": "o200k_base (bpe-openai); images by OpenAI's tile formula",
            "token_limit": token_limit,
            "epochs": estimate.epochs,
            "billing_tokens_per_epoch": estimate.billing_tokens_per_epoch,
            "training_tokens": estimate.training_tokens,
            "price_per_mtok": estimate.price_per_mtok,
            "cost_usd": estimate.cost_usd,
        },
        "upload": None,
    }
    return Dataset(train, validation, rejected, manifest)


def write_rejected(dest: Store, rejected: list[Rejected]) -> None:
    dest.write_bytes(
        "rejected.jsonl",
        b"".join(r.model_dump_json().encode() + b"\n" for r in rejected),
        "application/jsonl",
    )


@task(name="write-dataset", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def write_dataset(out: str, dataset: Dataset, storage: StorageConfig | None = None) -> None:
    """train.jsonl, validation.jsonl, rejected.jsonl and manifest.json under ``out``."""
    dest = open_store(out, storage)
    dest.write_bytes("train.jsonl", to_jsonl(dataset.train), "application/jsonl")
    dest.write_bytes("validation.jsonl", to_jsonl(dataset.validation), "application/jsonl")
    write_rejected(dest, dataset.rejected)
    dest.write_bytes(
        "manifest.json",
        json.dumps(dataset.manifest, ensure_ascii=False, indent=2).encode(),
        "application/json",
    )


def manifest_markdown(manifest: dict) -> str:
    """A short Markdown summary of the manifest for the Prefect UI (no patient ids)."""
    rows = [
        f"| {name} | {m['examples']} | {len(m['patients'])} | {m['abnormal']} | {m['normal']} "
        f"| {m['checks']['tokens_total']} | `{m['sha256'][:16]}` |"
        for name, m in (("train", manifest["train"]), ("validation", manifest["validation"]))
    ]
    est = manifest["estimate"]
    return "\n".join(
        [
            "| split | examples | patients | abnormal | normal | tokens | sha256 |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"{manifest['rejected']['count']} annotation(s) rejected (rejected.jsonl). "
            f"Estimate: {est['epochs']} epochs, {est['training_tokens']} training tokens, "
            f"${est['cost_usd']:.2f} at ${est['price_per_mtok']:g}/M tokens.",
        ]
    )
