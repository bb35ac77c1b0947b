"""Upload a fine-tune dataset with the official OpenAI SDK (Files API, purpose "fine-tune")
and create a supervised fine-tuning job (``fine_tuning.jobs.create``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import openai
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.core.config import ModelConfig, Provider, Settings
from tasks.core.errors import ConfigError, ProviderError
from tasks.core.redact import redact
from tasks.models.client import sdk_client

__all__ = ["Hyperparameters", "create_job", "openai_endpoint", "upload_dataset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hyperparameters:
    """None = let the provider choose ("auto")."""

    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None

    def as_api(self) -> dict:
        return {
            k: v
            for k, v in (
                ("n_epochs", self.n_epochs),
                ("batch_size", self.batch_size),
                ("learning_rate_multiplier", self.learning_rate_multiplier),
            )
            if v is not None
        }


def openai_endpoint(settings: Settings) -> ModelConfig:
    """The first OpenAI-protocol model of the config: its base_url and key are used."""
    for model in settings.models:
        if model.provider is Provider.OPENAI:
            return model
    raise ConfigError(
        "--upload needs an OpenAI-protocol endpoint: the config has no model with provider openai",
        hint="add one (its base_url and api_key_env are used for the upload)",
    )


def create_job(
    client: openai.OpenAI,
    train: bytes,
    validation: bytes | None,
    *,
    base_model: str,
    hyperparameters: Hyperparameters,
    suffix: str | None,
    seed: int,
) -> dict:
    """Upload the files and create the job; returns the file ids, job id and status."""
    train_file = client.files.create(file=("train.jsonl", train), purpose="fine-tune")
    val_file = (
        client.files.create(file=("validation.jsonl", validation), purpose="fine-tune")
        if validation
        else None
    )
    job = client.fine_tuning.jobs.create(
        model=base_model,
        training_file=train_file.id,
        validation_file=val_file.id if val_file else openai.omit,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": hyperparameters.as_api()},
        },
        suffix=suffix or openai.omit,
        seed=seed,
    )
    return {
        "training_file": train_file.id,
        "validation_file": val_file.id if val_file else None,
        "job_id": job.id,
        "status": job.status,
        "base_model": base_model,
        "hyperparameters": hyperparameters.as_api(),
    }


# No task retries: the SDK already retries 429/5xx, and creating a job is not idempotent.
@task(name="upload-dataset", retries=0, timeout_seconds=3600, cache_policy=NO_CACHE)
def upload_dataset(
    train: bytes,
    validation: bytes | None,
    settings: Settings,
    *,
    base_model: str,
    hyperparameters: Hyperparameters,
    suffix: str | None,
    seed: int,
) -> dict:
    """Upload both files and create the fine-tuning job at the config's OpenAI endpoint (the
    SDK retries 429/5xx itself); errors name the endpoint, never the key."""
    model = openai_endpoint(settings)
    client = sdk_client(model, settings.gateway, sync=True)  # registers the key first
    host = model.endpoint(settings.gateway)[0] or "api.openai.com"
    try:
        result = create_job(
            client,
            train,
            validation,
            base_model=base_model,
            hyperparameters=hyperparameters,
            suffix=suffix,
            seed=seed,
        )
    except openai.APIError as exc:
        raise ProviderError(redact(f"fine-tuning upload to {host} failed: {exc}")) from exc
    finally:
        client.close()
    get_run_logger().info(
        "uploaded %s (+ %s) to %s; fine-tuning job %s is %s",
        result["training_file"],
        result["validation_file"],
        host,
        result["job_id"],
        result["status"],
    )
    return {**result, "endpoint": host}
