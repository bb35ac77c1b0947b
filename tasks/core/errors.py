"""Exception types of radflow, each with a default message and a hint of what to do; which of
them are worth retrying; and what an exception from the DICOM parser (or from pydicom reading
a header value) says about its input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "AnnotationError",
    "ConfigError",
    "CorruptDicom",
    "DatasetError",
    "DuplicateInstance",
    "EvaluationRegression",
    "HEADER_ERRORS",
    "IdentityConflict",
    "LabelError",
    "LimitMissing",
    "NotDicom",
    "NotificationError",
    "ObjectMissing",
    "PacsError",
    "PhiRisk",
    "ProviderError",
    "ProviderRejected",
    "RadflowError",
    "ReportError",
    "ReviewError",
    "RunSummaryError",
    "StorageError",
    "StorageUnavailable",
    "StudiesFailed",
    "SymlinkEscape",
    "UnsupportedImage",
    "WorkerCrashed",
    "is_transient",
    "parser_error",
    "reading_header",
    "retry_if_transient",
]


class RadflowError(Exception):
    """Base class: ``str(err)`` is one line naming the input and the reason."""

    default = "radflow failed"
    hint = ""

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.hint = hint if hint is not None else type(self).hint
        super().__init__(message or self.default)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(RadflowError):
    default = "the configuration is invalid"
    hint = "check the YAML against docs/config.md (every key, its bounds and choices)"


class LimitMissing(ConfigError):
    default = "a global model limit does not exist on the Prefect server"
    hint = (
        "create the limits from the config: `radflow limits sync --config FILE` "
        "(docs/scaling.md#global-limits)"
    )


class LabelError(RadflowError):
    default = "the evaluation labels are invalid"
    hint = "LABELS is CSV with study_instance_uid,abnormal (0/1); optional patient_id,findings"


class EvaluationRegression(RadflowError):
    default = "accuracy dropped since the previous evaluation"
    hint = "compare DEST/metrics.json with the previous run; check models, prompt and config"


class AnnotationError(RadflowError):
    default = "the annotation is invalid"
    hint = "fix the line in the annotations file (see docs/datasets.md)"


class DatasetError(RadflowError):
    default = "the fine-tune dataset cannot be built"
    hint = "see DEST/rejected.jsonl for the annotations that were skipped"


class NotDicom(RadflowError):
    default = "not a DICOM file"
    hint = "only DICOM Part 10 files are screened; remove other files from the source"


class NotificationError(RadflowError):
    default = "the queue message is not an S3 event notification"
    hint = "point the bucket's ObjectCreated notification at this queue (see infra/aws.md)"


class CorruptDicom(RadflowError):
    default = "the DICOM file is corrupt or truncated"
    hint = "re-export the instance from the PACS"


class UnsupportedImage(RadflowError):
    default = "the DICOM object holds no image radflow can render"
    hint = "only image objects (CT, MR, CR, DX, US, ...) with pixel data are screened"


class DuplicateInstance(RadflowError):
    default = "the instance is read from another copy"
    hint = "the source holds copies of one instance; remove the extra copies"


class IdentityConflict(RadflowError):
    default = "instances disagree on whose images they are or which instance they are"
    hint = (
        "one study holds one patient's images and one SOPInstanceUID names one instance: "
        "re-export the study from the PACS, or correct the UIDs or patient attributes"
    )


class PhiRisk(RadflowError):
    default = "the image may carry burned-in patient identifiers"
    hint = "de-identify the pixels first, or set preprocess.burned_in: allow"


class ReportError(RadflowError):
    default = "a report could not be written"
    hint = "this is a radflow bug if the inputs were valid; please report it with the study UID"


class ReviewError(RadflowError):
    default = "the radiologist review cannot be recorded"
    hint = (
        "the study needs studies/<uid>/report.json under DEST; deploy the review deployment "
        "(deployments/prefect.yaml) and serve it (`radflow serve` or a worker)"
    )


class RunSummaryError(RadflowError):
    default = "the run summary cannot be read"
    hint = "pass DEST/runs/<run id>.json files written by `radflow screen` (a folder or s3://)"


class ProviderError(RadflowError):
    default = "the model provider failed"
    hint = "check base_url, the API key variable and the provider's status"


class ProviderRejected(ProviderError):
    """The provider refused the model's key (401/403) or does not know its model id (404):
    every call would fail the same way, so the run stops at the first one."""

    default = "the provider rejected the model's key or model id"
    hint = "fix the key (or the model id) and run again: the studies not reported are read then"


class StorageError(RadflowError):
    default = "storage access failed"
    hint = "check the path or bucket, the credentials and the permissions"


class StorageUnavailable(StorageError):
    """Transient: throttling, 5xx or connection resets that outlasted the client's retries."""

    default = "storage is unavailable"
    hint = "the store kept failing after retries; run again later (finished studies are skipped)"


class SymlinkEscape(StorageError):
    """A key of a local folder reached through a symlink that leads out of the folder."""

    default = "a symlink leads out of the folder"
    hint = (
        "replace the symlink with the file or folder itself, or point SOURCE/DEST at the "
        "folder it leads to"
    )


class ObjectMissing(RadflowError):
    default = "the object is gone"
    hint = "it was listed but deleted or moved before it could be read; run again"


class PacsError(RadflowError):
    """One study or instance the DICOMweb server would not give (or take): it fails that
    object, not the run. A search the whole run depends on fails as a StorageError."""

    default = "the PACS refused or failed a request"
    hint = "check the DICOMweb URL, the dicomweb settings and the server's log"


class WorkerCrashed(RadflowError):
    default = "a process-pool worker died"
    hint = (
        "a worker runs out of memory, crashes in a decoder, or cannot start: a script that "
        'starts a run needs `if __name__ == "__main__":` (Python\'s spawn rule); '
        "or set runner.preprocess: thread"
    )


class StudiesFailed(RadflowError):
    """Studies of one batch failed; ``transient`` when any of them failed in a way worth
    trying again (see :func:`is_transient`)."""

    default = "studies failed"
    hint = "each study's error record names its reason; a rerun screens what was not reported"

    def __init__(
        self, message: str | None = None, *, hint: str | None = None, transient: bool = False
    ) -> None:
        super().__init__(message, hint=hint)
        self.transient = transient


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may succeed: storage throttled or down after the client's retries
    (StorageUnavailable), a lost pool process (WorkerCrashed: it also takes down the other
    studies in that pool), an OS or network error (OSError, which covers ConnectionError and
    TimeoutError), or a batch in which a study failed so. Every other RadflowError is a
    property of its input (corrupt, unsupported, denied, ...) and an unexpected exception is a
    bug: the same input fails the same way again."""
    if isinstance(exc, StudiesFailed):
        return exc.transient
    if isinstance(exc, RadflowError):
        return isinstance(exc, StorageUnavailable | WorkerCrashed)
    return isinstance(exc, OSError)


def retry_if_transient(task: object, task_run: object, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry only :func:`is_transient` failures. ``state``
    is the Failed state Prefect builds around the exception the task run raised (its
    ``data``); a state without one is left to Prefect's default, a retry."""
    exc = state.data
    return not isinstance(exc, BaseException) or is_transient(exc)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what led to it (pydicom re-raises some errors as a bare OSError)."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
        chain.append(nxt)
    return chain


def _depth(exc: BaseException) -> int:
    """Levels of nested sequences pydicom was reading where ``exc`` was raised (its
    ``read_sequence`` runs once per level)."""
    depth, tb = 0, exc.__traceback__
    while tb is not None:
        depth += tb.tb_frame.f_code.co_name == "read_sequence"
        tb = tb.tb_next
    return depth


def parser_error(exc: BaseException, what: str) -> RadflowError:
    """The error to raise for ``exc``, anything pydicom or a pixel decoder raised while
    reading one object: a CorruptDicom saying ``what`` and why, in one line —
    sequences nested past Python's recursion limit are "nesting too deep" with the depth
    reached, exhausted memory says so, else the parser's own message. A StorageError among
    the causes (a ranged S3 read failing under the parser) is returned as it is: it is not
    about the object."""
    chain = _causes(exc)
    storage = next((c for c in chain if isinstance(c, StorageError)), None)
    if storage is not None:
        return storage
    if any(isinstance(c, RecursionError) for c in chain):
        depth = max(_depth(c) for c in chain)
        reason = f"nesting too deep (more than {depth} levels of nested sequences)"
    elif any(isinstance(c, MemoryError) for c in chain):
        reason = "decoding needs more memory than this process could allocate (MemoryError)"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = "; ".join(lines) or type(exc).__name__
    return CorruptDicom(f"{what}: {reason}")


# What pydicom raises when it converts an inconsistent header value on first use (a raw
# element of the wrong length, a DS/IS that is not a number, a LUT descriptor of two values),
# and what int()/float() of such a value raise.
HEADER_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


@contextmanager
def reading_header(what: str = "inconsistent header") -> Iterator[None]:
    """Around pydicom reading header values of one object (``ds.Rows``, ``int(...)`` of a
    value, pydicom's LUT functions): the :data:`HEADER_ERRORS` raised inside become that
    object's CorruptDicom, ``what``: the reason (see :func:`parser_error`). Only such calls
    go inside, never radflow's own logic: a bug of radflow's surfaces as the bug it is, not
    as "inconsistent header" on every file."""
    try:
        yield
    except HEADER_ERRORS as exc:
        raise parser_error(exc, what) from exc
