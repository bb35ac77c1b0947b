"""Exception types of radflow, each with a default message and a hint of what to do."""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "ConfigError",
    "CorruptDicom",
    "DatasetError",
    "EvaluationRegression",
    "LabelError",
    "NotDicom",
    "NotificationError",
    "ObjectMissing",
    "PhiRisk",
    "ProviderError",
    "RadflowError",
    "ReportError",
    "ReviewError",
    "StorageError",
    "StorageUnavailable",
    "StudiesFailed",
    "UnsupportedImage",
    "WorkerCrashed",
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
    hint = "check the YAML against the Config section of the README"


class LabelError(RadflowError):
    default = "the evaluation labels are invalid"
    hint = "LABELS is CSV with study_instance_uid,abnormal (0/1); optional patient_id,findings"


class EvaluationRegression(RadflowError):
    default = "accuracy dropped since the previous evaluation"
    hint = "compare DEST/metrics.json with the previous run; check models, prompt and config"


class AnnotationError(RadflowError):
    default = "the annotation is invalid"
    hint = "fix the line in the annotations file (see the README's fine-tune dataset section)"


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


class ProviderError(RadflowError):
    default = "the model provider failed"
    hint = "check base_url, the API key variable and the provider's status"


class StorageError(RadflowError):
    default = "storage access failed"
    hint = "check the path or bucket, the credentials and the permissions"


class StorageUnavailable(StorageError):
    """Transient: throttling, 5xx or connection resets that outlasted the client's retries."""

    default = "storage is unavailable"
    hint = "the store kept failing after retries; run again later (finished studies are skipped)"


class ObjectMissing(RadflowError):
    default = "the object is gone"
    hint = "it was listed but deleted or moved before it could be read; run again"


class WorkerCrashed(RadflowError):
    default = "a process-pool worker died"
    hint = (
        "a worker runs out of memory, crashes in a decoder, or cannot start: a script that "
        'starts a run needs `if __name__ == "__main__":` (Python\'s spawn rule); '
        "or set runner.preprocess: thread"
    )


class StudiesFailed(RadflowError):
    default = "studies failed"
    hint = "each study's error record names its reason; a rerun screens what was not reported"
