"""radflow settings: one pydantic model loaded from YAML (``--config``, ``$RADFLOW_CONFIG``,
``./radflow.yaml``, else the built-in defaults)."""

from __future__ import annotations

import logging
import os
import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from tasks.core.errors import ConfigError
from tasks.core.redact import register
from tasks.pacs.settings import DicomWebConfig, PublishConfig

__all__ = [
    "EvaluationConfig",
    "Gateway",
    "Language",
    "ModelConfig",
    "PreprocessConfig",
    "Price",
    "PrivacyConfig",
    "Provider",
    "ReviewConfig",
    "RunnerConfig",
    "Settings",
    "StructuredOutput",
    "SynthesisConfig",
    "StorageConfig",
    "WindowName",
    "load_settings",
]

logger = logging.getLogger(__name__)


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class Language(StrEnum):
    KO = "ko"
    EN = "en"


class StructuredOutput(StrEnum):
    """How an OpenAI-protocol model is asked for the reading's JSON (docs/models.md)."""

    JSON_SCHEMA = "json_schema"  # response_format json_schema, strict
    JSON_MODE = "json_mode"  # response_format json_object, the schema in the prompt
    AUTO = "auto"  # json_schema; after one 400 refusing it, json_mode for the rest of the run


class WindowName(StrEnum):
    """How stored values become display grey levels (see ``tasks.imaging.preprocess``)."""

    AUTO = "auto"
    HEADER = "header"
    NONE = "none"
    LUNG = "lung"
    MEDIASTINUM = "mediastinum"
    BONE = "bone"
    BRAIN = "brain"
    ABDOMEN = "abdomen"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


class _Endpoint(_Strict):
    base_url: str | None = Field(None, description="OpenAI-/Anthropic-compatible endpoint URL")
    api_key_env: str | None = Field(
        None,
        description="environment variable holding the API key; its value is sent to the "
        "endpoint as a bearer token (a name without KEY or TOKEN, or a cloud credential such "
        "as AWS_*, logs a warning at config load)",
    )
    api_key_block: str | None = Field(None, description="name of a Prefect Secret block")


class Gateway(_Endpoint):
    """One relay and one key for every model of the panel; each model may override."""


class ModelConfig(_Endpoint):
    name: str = Field(..., min_length=1, max_length=64, description="label used in reports")
    provider: Provider = Field(..., description="wire protocol: openai | anthropic")
    model: str = Field(..., min_length=1, description="model id sent to the API")
    max_concurrency: int = Field(8, ge=1, le=512, description="in-flight calls for this model")
    weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="consensus weight (a `reliability` file naming the model replaces it)",
    )
    price: Price = Field(default_factory=Price, description="USD per million tokens")
    timeout_seconds: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="timeout of each HTTP attempt (a timed-out one is retried)",
    )
    max_retries: int = Field(2, ge=0, le=10, description="SDK retries on 429/5xx/timeouts")
    max_output_tokens: int = Field(1024, ge=64, le=32768, description="answer token budget")
    structured_output: StructuredOutput = Field(
        StructuredOutput.AUTO,
        description="provider openai only: json_schema (strict response_format) | json_mode "
        "(json_object, the schema in the prompt, validated here) | auto (json_schema; a 400 "
        "refusing it switches the model to json_mode for the rest of the run); Anthropic "
        "models answer through a forced tool either way",
    )
    extra_headers: dict[str, str] = Field(
        default_factory=dict,
        description="sent on every call (gateways that need them); the values are treated as "
        "secrets, redacted from every error, log line and output",
    )
    requests_per_minute: float | None = Field(
        None, gt=0, le=100_000, description="request rate limit for this model (retries count)"
    )
    fallback: ModelConfig | None = Field(
        None, description="model asked when this one fails (error, refusal, invalid answer)"
    )

    def endpoint(self, gateway: Gateway | None) -> tuple[str | None, str | None, str | None]:
        """(base_url, api_key_env, api_key_block) with the gateway filling what is unset."""
        g = gateway or Gateway()
        key_env, key_block = self.api_key_env, self.api_key_block
        if key_env is None and key_block is None:
            key_env, key_block = g.api_key_env, g.api_key_block
        return self.base_url or g.base_url, key_env, key_block

    def api_key(self, gateway: Gateway | None) -> SecretStr:
        """The key from the env var or Prefect Secret block named in the config, registered
        with ``tasks.core.redact`` as soon as it is read."""
        _, key_env, key_block = self.endpoint(gateway)
        if key_block:
            from prefect.blocks.system import Secret

            value = str(Secret.load(key_block, _sync=True).get())
        elif not key_env:
            raise ConfigError(f'model "{self.name}" names no api_key_env or api_key_block')
        else:
            value = os.environ.get(key_env, "")
            if not value:
                raise ConfigError(
                    f'environment variable "{key_env}" for model "{self.name}" is not set',
                    hint=f"export {key_env}=... (the key is never logged)",
                )
        register(value)
        return SecretStr(value)

    def client_options(self, gateway: Gateway | None) -> dict[str, Any]:
        """Keyword arguments of this model's SDK client (either SDK, sync or async). The key
        and every ``extra_headers`` value are registered with ``tasks.core.redact`` first, so no
        error, log line or output of this process can carry them."""
        key = self.api_key(gateway).get_secret_value()
        register(*self.extra_headers.values(), header_names=self.extra_headers)
        return dict(
            api_key=key,
            base_url=self.endpoint(gateway)[0],
            timeout=self.timeout_seconds,
            max_retries=self.max_retries,
            default_headers=self.extra_headers or None,
        )


class PreprocessConfig(_Strict):
    max_edge: int = Field(1024, ge=0, le=8192, description="long edge in px; 0 = no resize")
    window: WindowName = Field(
        WindowName.AUTO,
        description="grey-level window: auto = the header window, else the VOI LUT, else "
        "mediastinum for CT, else the full range; header = refuse a file without one; a preset "
        "(W/L) for CT",
    )
    burned_in: Literal["refuse", "refuse_unknown", "allow"] = Field(
        "refuse",
        description="BurnedInAnnotation policy (see tasks.imaging.preprocess.burned_in_flag): refuse = "
        "an error record when it says YES; refuse_unknown = also when it is missing or neither "
        "YES nor NO; allow = send the pixels anyway. The report's images[].burned_in records "
        "yes | no | unknown. Text in the pixels without the flag is not detected",
    )
    max_images_per_study: int = Field(
        4, ge=1, le=32, description="key images sent per study (one per series, middle slice)"
    )
    header_window: int = Field(
        0, ge=0, le=64, description="which header window (WindowCenter/Width index) to use"
    )
    key_images: str = Field(
        "middle",
        pattern=r"^(middle|spaced:[1-9][0-9]?|montage:[1-8]x[1-8])$",
        description="key images of a multi-frame object or series: middle | spaced:N | "
        "montage:RxC (R×C evenly spaced frames in one grid image)",
    )


class PrivacyConfig(_Strict):
    """How radflow's logs, Prefect artifacts, run names and tags name studies and sources."""

    log_uids: Literal["hash", "plain"] = Field(
        "hash",
        description="hash = a keyed pseudonym (HMAC-SHA256 with a secret kept in DEST) instead "
        "of the StudyInstanceUID and the SOURCE path; plain = as they are",
    )


class ReviewConfig(_Strict):
    """Which studies are flagged for a radiologist's review (the rules, recorded in each
    report's provenance) and the review runs that ask for the verdict (``requests`` and below:
    ``exclude=True`` keeps them out of ``model_dump()``, so provenance lists only the rules)."""

    min_agreement: float = Field(
        1.0, ge=0, le=1, description="flag a study for review below this agreement"
    )
    on_disagreement: bool = Field(True, description="flag when models disagree on abnormal")
    on_immediate: bool = Field(True, description="flag when any model says immediate")
    on_degraded: bool = Field(True, description="flag when a model failed or refused")
    requests: bool = Field(
        False,
        exclude=True,
        description="after screening, one review flow run per flagged study waits for a "
        "radiologist's verdict in the Prefect UI (needs the review deployment)",
    )
    deployment: str = Field(
        "review/flagged",
        pattern=r"^[^/\s]+/[^/\s]+$",
        exclude=True,
        description='"flow-name/deployment-name" of the review deployment (deployments/prefect.yaml)',
    )
    timeout_hours: float = Field(
        168.0,
        ge=0,
        le=8760,
        exclude=True,
        description="an unanswered review run fails after this long (Prefect's pause timeout); "
        "0 = it waits forever",
    )
    on_timeout: Literal["expire", "reopen"] = Field(
        "reopen",
        exclude=True,
        description="an expired review: reopen = the next screening run with requests on asks "
        "again (a new review run); expire = it stays expired (listed by `radflow reviews list`)",
    )
    page_image_edge: int = Field(
        512,
        ge=128,
        le=2048,
        exclude=True,
        description="long edge in px of the key images inlined in the review page artifact",
    )


class SynthesisConfig(_Strict):
    """The optional narrative impression: one panel model writes it from the structured
    readings only (no image); it never changes the structured consensus."""

    model: str = Field(..., min_length=1, description="name of a panel model that writes it")
    max_output_tokens: int = Field(400, ge=32, le=4096, description="impression token budget")


class StorageConfig(_Strict):
    """S3 access: encryption of every write, retries, concurrency and memory bounds; and
    DICOMweb access (the top-level ``dicomweb`` key lands here, so that a store reopened by
    URI in a pool process has it too)."""

    sse: Literal["AES256", "aws:kms"] = Field(
        "AES256", description="server-side encryption of every object written to S3"
    )
    kms_key_id: str | None = Field(
        None,
        min_length=1,
        description="KMS key id, ARN or alias for sse: aws:kms (else the account's AWS-managed key)",
    )
    max_concurrency: int = Field(
        16,
        ge=1,
        le=256,
        description="S3 GETs in flight (header reads, downloads) and error-record writers",
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "adaptive", description="botocore retry mode for throttling, 5xx and connection resets"
    )
    max_attempts: int = Field(8, ge=1, le=20, description="attempts per S3 call, first included")
    timeout_seconds: float = Field(60.0, gt=0, le=900, description="connect and read timeout")
    header_bytes: int = Field(
        65536, ge=1024, le=2**26, description="first ranged GET of a header read; doubles as needed"
    )
    multipart_threshold_mib: int = Field(
        8, ge=5, le=4096, description="writes and downloads past this use multipart parts"
    )
    dicomweb: DicomWebConfig = Field(
        default_factory=DicomWebConfig, description="set with the top-level `dicomweb` key"
    )

    @model_validator(mode="after")
    def _kms_needs_kms(self) -> StorageConfig:
        if self.kms_key_id and self.sse != "aws:kms":
            raise ValueError("kms_key_id is set but sse is not aws:kms")
        return self


class EvaluationConfig(_Strict):
    """The accuracy evaluation (`radflow evaluate`): intervals and the regression alert."""

    regression_margin: float = Field(
        0.05, ge=0, le=1, description="alert when sensitivity or specificity drops by more"
    )
    bootstrap_resamples: int = Field(
        1000, ge=100, le=100_000, description="bootstrap resamples for the 95 % intervals"
    )
    seed: int = Field(0, ge=0, description="seed of the bootstrap resampling")


def _default_models() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="gpt-4o",
            provider=Provider.OPENAI,
            model="gpt-4o",
            api_key_env="OPENAI_API_KEY",
            price=Price(input_per_mtok=2.5, output_per_mtok=10.0),
        ),
        ModelConfig(
            name="claude",
            provider=Provider.ANTHROPIC,
            model="claude-sonnet-4-6",
            api_key_env="ANTHROPIC_API_KEY",
            price=Price(input_per_mtok=3.0, output_per_mtok=15.0),
        ),
    ]


class RunnerConfig(_Strict):
    """How a screening run uses machines: preprocessing in threads or processes, and shards
    (child flow runs) for large runs. See docs/scaling.md."""

    preprocess: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="the CPU-bound work of a study (rendering, SR and FHIR reports) in threads "
        "or a process pool; auto = the pool for runs of 50 or more studies on 2 or more CPUs",
    )
    workers: int | None = Field(
        None, ge=1, le=256, description="process-pool size (null = one per CPU)"
    )
    decode_memory_mib: int | None = Field(
        None,
        ge=64,
        le=1_048_576,
        description="memory for decoding key images, across every study in flight, in MiB: "
        "a study waits until what its headers claim fits; null = a quarter of the machine's "
        "(or container's) memory, at most 8192",
    )
    retry_delays: list[Annotated[float, Field(ge=0, le=3600)]] = Field(
        [5, 30],
        max_length=10,
        description="seconds before each retry of a screen-studies task run whose study failed "
        "in a transient way (one retry per entry; [] = no retries)",
    )
    studies_per_task: int = Field(
        25,
        ge=1,
        le=10_000,
        description="studies per Prefect task run (each task run costs the API and the event "
        "loop 10-40 ms: per study, that was most of a run's orchestration overhead)",
    )
    shard_size: int = Field(
        0,
        ge=0,
        le=100_000,
        description="studies per child flow run when a run has more pending; 0 = one run",
    )
    shards_in_flight: int = Field(
        1, ge=1, le=1024, description="child flow runs at once (one per worker is typical)"
    )
    shard_deployment: str | None = Field(
        None,
        description='"flow-name/deployment-name" to run shards on a work pool with '
        "run_deployment; null = child flow runs in this process",
    )
    shard_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="runs of a shard on the work pool while its run crashes (a worker died): "
        "a re-run skips the studies reported and takes answered calls from the cache",
    )
    shard_silence_seconds: float = Field(
        90,
        ge=60,
        le=86_400,
        description="a shard run on a work pool that sends no heartbeat (one every 30 s) this "
        "long is marked Crashed by the server and run again: its worker is gone",
    )


class Settings(_Strict):
    language: Language = Field(Language.KO, description="report and prompt language")
    source: str | None = Field(None, description="default SOURCE for scheduled runs")
    output: str | None = Field(None, description="default DEST for scheduled runs")
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig,
        description="how a study's key images are chosen and rendered (what the models see)",
    )
    gateway: Gateway | None = Field(
        None, description="one relay and one key for every model; each model may override"
    )
    models: list[ModelConfig] = Field(
        default_factory=_default_models,
        min_length=1,
        description="the panel: every model reads every study; names must be unique",
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig,
        description="which studies are flagged for a radiologist, and the review runs that ask",
    )
    synthesis: SynthesisConfig | None = Field(
        None, description="optional model-written impression; null = none"
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="S3 access: encryption of every write, retries, timeouts, concurrency",
    )
    reliability: str | None = Field(
        None,
        description="reliability.json (path or s3 uri) written by `radflow evaluate`: its "
        "measured weights replace the configured ones of the models it names",
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig,
        description="`radflow evaluate`: bootstrap intervals and the regression alert",
    )
    max_studies_in_flight: int = Field(
        64, ge=1, le=4096, description="studies being read at once (bounds memory)"
    )
    limits: Literal["auto", "local", "global"] = Field(
        "auto",
        description="where the models' max_concurrency and requests_per_minute hold: local = "
        "within one process; global = also across every process and worker, as Prefect "
        "global concurrency and rate limits (radflow-model-<name>, radflow-rpm-<name>; "
        "create them with `radflow limits sync`); auto = global when shards run on a work "
        "pool (runner.shard_deployment), local otherwise",
    )
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig, description="process pool and shards for large runs"
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="pseudonyms in logs, artifacts and run names"
    )
    claim_lease_seconds: float = Field(
        300,
        ge=10,
        le=86_400,
        description="lease of a run's claim on a study it reads (DEST/claims/), renewed every "
        "third of it: how long a crashed run on another host holds its studies",
    )
    publish: PublishConfig = Field(
        default_factory=PublishConfig, description="publish reports back to a PACS (STOW-RS)"
    )

    @model_validator(mode="before")
    @classmethod
    def _dicomweb_into_storage(cls, data: object) -> object:
        """``dicomweb:`` (top level, as documented) is kept as ``storage.dicomweb``."""
        if isinstance(data, dict) and "dicomweb" in data:
            data = dict(data)
            storage = dict(data.get("storage") or {})
            if "dicomweb" in storage:
                raise ValueError("dicomweb is set twice: at the top level and under storage")
            storage["dicomweb"] = data.pop("dicomweb")
            data["storage"] = storage
        return data

    @property
    def dicomweb(self) -> DicomWebConfig:
        return self.storage.dicomweb

    @model_validator(mode="after")
    def _resolve_limits(self) -> Settings:
        """``auto`` becomes ``global`` for shards on a work pool (several processes, maybe
        machines, share the panel's provider limits), ``local`` otherwise."""
        if self.limits == "auto":
            self.limits = "global" if self.runner.shard_deployment else "local"
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dupes)}")
        if self.synthesis and self.synthesis.model not in names:
            raise ValueError(
                f'synthesis.model "{self.synthesis.model}" is not a panel model '
                f"(known: {', '.join(names)})"
            )
        return self


_QUOTED = re.compile(r"'[^']*'")
_TOKEN_NAME = re.compile(r"'(<[a-z ]+>|[^']{0,2})'")  # '<scalar>', a character: not file text
_CLOUD_CREDENTIAL = re.compile(r"(AWS|AZURE)_\w+|GOOGLE_APPLICATION_CREDENTIALS|GOOGLE_OAUTH_\w+")


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """(where, what) of a YAML error without the file's text: PyYAML's own message quotes
    the offending line, and ``--config`` may name any file (a credentials file, say); quoted
    aliases, anchors and tags are elided, token names and single characters kept."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f" at character {exc.position + 1}", exc.reason
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    problem = "; ".join(p for p in parts if p) or type(exc).__name__
    return where, _QUOTED.sub(lambda m: m[0] if _TOKEN_NAME.fullmatch(m[0]) else "'…'", problem)


@cache  # once per process: the CLI and then the flow load the same config
def _warn_key_env(owner: str, variable: str) -> None:
    name = variable.upper()
    if _CLOUD_CREDENTIAL.fullmatch(name) and not name.endswith("_API_KEY"):
        kind = "names a cloud credential"
    elif "KEY" in name or "TOKEN" in name:
        return
    else:
        kind = "does not look like an API key (no KEY or TOKEN in its name)"
    logger.warning(
        '%s: api_key_env "%s" %s; its value is sent to the model endpoint as a bearer token',
        owner,
        variable,
        kind,
    )


def _check_key_envs(settings: Settings) -> None:
    """Warn about api_key_env variables that are not API keys (e.g. AWS_SECRET_ACCESS_KEY):
    whatever they hold goes to the model endpoint."""
    if settings.gateway and settings.gateway.api_key_env:
        _warn_key_env("gateway", settings.gateway.api_key_env)
    for model in settings.models:
        while model is not None:
            if model.api_key_env:
                _warn_key_env(f'model "{model.name}"', model.api_key_env)
            model = model.fallback


def load_settings(path: str | Path | None = None) -> Settings:
    """Load settings from ``path``, ``$RADFLOW_CONFIG``, ``./radflow.yaml`` or the defaults.
    Errors name the file and a position, never its content."""
    if path is None:
        path = os.environ.get("RADFLOW_CONFIG") or (
            "radflow.yaml" if Path("radflow.yaml").is_file() else None
        )
    if path is None:
        logger.info("no config file; using built-in defaults")
        return Settings()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f'cannot read config "{path}": {exc.strerror}') from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f'config "{path}" is not UTF-8 text (invalid byte at offset {exc.start})'
        ) from None
    except yaml.YAMLError as exc:
        where, problem = _yaml_problem(exc)
        raise ConfigError(f'config "{path}" is not valid YAML{where}: {problem}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config "{path}" must be a YAML mapping')
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f'config "{path}" is invalid: {errors}') from None
    _check_key_envs(settings)
    return settings
