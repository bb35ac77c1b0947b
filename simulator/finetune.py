"""The simulator's fine-tuning endpoints (OpenAI wire protocol): POST /v1/files (multipart),
GET /v1/files/{id}, POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs[/{id}].

A TEST DOUBLE: files are kept in memory and checked line by line as OpenAI documents (each line
a JSON object with a ``messages`` list ending in an assistant message); jobs never train, they
stay ``validating_files`` and their ids start with ``ftjob-sim-``."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["FinetuneState", "finetune_routes"]


@dataclass
class FinetuneState:
    files: dict[str, dict] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": f"radflow simulator: {message}",
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        },
        status_code=status,
    )


def _authorised(request: Request) -> bool:
    return bool(request.headers.get("authorization", "").removeprefix("Bearer ").strip())


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: {name: (filename, bytes)} (stdlib parser)."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _check_jsonl(data: bytes) -> str | None:
    """The first problem of a chat fine-tuning JSONL file, or None."""
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "the file has no examples"
    for number, line in enumerate(lines, 1):
        try:
            example = json.loads(line)
        except ValueError:
            return f"line {number} is not JSON"
        messages = example.get("messages") if isinstance(example, dict) else None
        if not isinstance(messages, list) or not messages:
            return f"line {number} has no messages list"
        if messages[-1].get("role") != "assistant":
            return f"line {number} does not end with an assistant message"
    return None


def finetune_routes(state: FinetuneState) -> list[Route]:
    async def create_file(request: Request) -> JSONResponse:
        if not _authorised(request):
            return _error(401, "missing API key")
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields:
            return _error(400, "multipart field 'file' is required", "file")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "fine-tune":
            return _error(400, f"purpose '{purpose}' is not supported here", "purpose")
        filename, content = fields["file"]
        problem = _check_jsonl(content)
        if problem:
            return _error(400, f"invalid file '{filename}': {problem}", "file")
        file_id = f"file-sim-{uuid.uuid4().hex[:16]}"
        state.contents[file_id] = content
        state.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename or "upload.jsonl",
            "purpose": purpose,
            "status": "processed",
        }
        return JSONResponse(state.files[file_id])

    async def get_file(request: Request) -> JSONResponse:
        file = state.files.get(request.path_params["file_id"])
        return JSONResponse(file) if file else _error(404, "no such file", "file_id")

    async def create_job(request: Request) -> JSONResponse:
        if not _authorised(request):
            return _error(401, "missing API key")
        try:
            body = json.loads(await request.body())
            model, training_file = str(body["model"]), str(body["training_file"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with model and training_file")
        for param in ("training_file", "validation_file"):
            if body.get(param) is not None and body[param] not in state.files:
                return _error(400, f"{param} '{body[param]}' does not exist", param)
        method = body.get("method") or {"type": "supervised", "supervised": {}}
        hyper = (method.get(method.get("type", ""), {}) or {}).get("hyperparameters") or {}
        hyper = {**hyper, **(body.get("hyperparameters") or {})}
        job_id = f"ftjob-sim-{uuid.uuid4().hex[:16]}"
        state.jobs[job_id] = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {
                "n_epochs": hyper.get("n_epochs", "auto"),
                "batch_size": hyper.get("batch_size", "auto"),
                "learning_rate_multiplier": hyper.get("learning_rate_multiplier", "auto"),
            },
            "method": method,
            "model": model,
            "organization_id": "org-radflow-simulator",
            "result_files": [],
            "seed": int(body.get("seed") or 0),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": training_file,
            "validation_file": body.get("validation_file"),
            "suffix": body.get("suffix"),
            "metadata": {"test_double": "radflow-simulator"},
        }
        return JSONResponse(state.jobs[job_id])

    async def list_jobs(request: Request) -> JSONResponse:
        jobs = sorted(state.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        return JSONResponse({"object": "list", "data": jobs, "has_more": False})

    async def get_job(request: Request) -> JSONResponse:
        job = state.jobs.get(request.path_params["job_id"])
        return JSONResponse(job) if job else _error(404, "no such job", "job_id")

    return [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files/{file_id}", get_file, methods=["GET"]),
        Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", get_job, methods=["GET"]),
    ]
