"""The fine-tune dataset flow: annotations → examples → patient split + checks → DEST (→ upload)."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.core.config import load_settings
from tasks.core.errors import DatasetError
from tasks.finetune.build import (
    assemble,
    build_examples,
    manifest_markdown,
    read_annotations,
    write_dataset,
    write_rejected,
)
from tasks.finetune.examples import to_jsonl
from tasks.finetune.upload import Hyperparameters, upload_dataset
from tasks.storage import open_store

__all__ = ["build_finetune_dataset"]


@flow(name="build-finetune-dataset", flow_run_name="dataset-{out}", log_prints=True)
def build_finetune_dataset(
    annotations: str,
    images: str,
    out: str,
    val_fraction: float = 0.2,
    upload: bool = False,
    config: str | None = None,
    seed: int = 0,
    base_model: str = "gpt-4o-2024-08-06",
    n_epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate_multiplier: float | None = None,
    suffix: str | None = None,
    token_limit: int = 65_536,
    price_per_mtok: float = 25.0,
) -> dict:
    """Build DEST/train.jsonl, validation.jsonl, rejected.jsonl and manifest.json from
    annotated studies; with ``upload`` also create a fine-tuning job. Returns the manifest."""
    logger = get_run_logger()
    settings = load_settings(config)
    parsed, rejected, annotations_sha = read_annotations(annotations, settings.storage)
    examples, bad_images = build_examples(parsed, images, settings)
    try:
        dataset = assemble(
            examples,
            rejected + bad_images,
            settings=settings,
            source={"annotations": annotations, "sha256": annotations_sha, "images": images},
            val_fraction=val_fraction,
            seed=seed,
            token_limit=token_limit,
            price_per_mtok=price_per_mtok,
            epochs=n_epochs,
        )
    except DatasetError:
        write_rejected(
            open_store(out, settings.storage), sorted(rejected + bad_images, key=lambda r: r.line)
        )
        raise
    write_dataset(out, dataset, settings.storage)
    m = dataset.manifest
    logger.info(
        "train %d examples (%d patients), validation %d (%d patients), %d rejected; "
        "≈%d training tokens, ≈$%.2f",
        m["train"]["examples"],
        len(m["train"]["patients"]),
        m["validation"]["examples"],
        len(m["validation"]["patients"]),
        m["rejected"]["count"],
        m["estimate"]["training_tokens"],
        m["estimate"]["cost_usd"],
    )
    create_markdown_artifact(
        key="finetune-dataset", markdown=manifest_markdown(m), description=f"dataset in {out}"
    )
    if upload:
        m["upload"] = upload_dataset(
            to_jsonl(dataset.train),
            to_jsonl(dataset.validation) if dataset.validation else None,
            settings,
            base_model=base_model,
            hyperparameters=Hyperparameters(n_epochs, batch_size, learning_rate_multiplier),
            suffix=suffix,
            seed=seed,
        )
        open_store(out, settings.storage).write_bytes(
            "manifest.json", json.dumps(m, ensure_ascii=False, indent=2).encode()
        )
    return m
