"""Secrets never reach an output, a log line or the Prefect API: one redaction path for every
outbound call's error (tasks/core/redact.py), a log hook that scrubs every record of the process,
and parse errors of input files that name a position, never the content. End to end, every
kind of outbound call fails against the simulator's leaky endpoint (which echoes every request
header, the key and the gateway token included, into its 400/401/403 error body)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import subprocess
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import yaml
from pydicom.uid import generate_uid

from simulator.samples import synthetic_ct
from tasks.core.config import load_settings
from tasks.core.errors import ConfigError
from tasks.finetune.examples import parse_annotations
from tests.helpers import KEY_ENV, TEST_KEY, run_radflow

HEADER = "X-Gateway-Token"
TOKEN = "gw-token-5f1c9e7a2b8d4c36-never-logged"  # an extra_headers value (a gateway token)
# Key-shaped fakes, assembled here so that no key-shaped literal sits in the tree (secret
# scanners flag those); each still has the shape the redactor must catch.
FAKE_AWS_KEY_ID = "AKIA" + "FAKE" + "0" * 12
FAKE_AWS_SECRET = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCY" + "FAKE" * 2 + "X" * 2
FAKE_OPENAI_KEY = "sk-" + "proj-" + "Zx81Qw0PmVb7Lk2Nj5Hg3Fd6Sa9"
FAKE_LIVE_KEY = "sk-" + "live-" + "0a1b2c3d4e5f6a7b8c9d"


# ---- the redactor -----------------------------------------------------------------------------


def test_redactor_replaces_known_secrets_and_token_shaped_strings():
    from tasks.core.redact import Redactor

    redact = Redactor()
    slashed = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY=="  # percent-encoded in a URL, escaped in JSON
    redact.add(TEST_KEY, TOKEN, slashed, header_names=[HEADER])
    unknown = FAKE_OPENAI_KEY  # a key radflow never saw
    leaks = {
        f"Error code: 401 - invalid key Bearer {TEST_KEY}": TEST_KEY,
        json.dumps({"authorization": f"Bearer {TEST_KEY}", HEADER.lower(): TOKEN}): TOKEN,
        f"headers: {{'x-gateway-token': 'short1', 'x-api-key': '{unknown}'}}": "short1",
        f"key {unknown} is revoked": unknown,
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl": "eyJhbGci",
        "proxy said: authorization=Basic dXNlcjpwYXNzd29yZDE=": "dXNlcjpwYXNzd29yZDE",
        "x-api-key: 0123456789abcdef0123": "0123456789abcdef0123",
        f"credentials {FAKE_AWS_KEY_ID} were rejected": FAKE_AWS_KEY_ID,
        f"GET /v1/models?key={quote(slashed, safe='')}": "K7MDENG",
        json.dumps({"detail": f"bad key {slashed}"}).replace("/", "\\/"): "K7MDENG",
    }
    for text, secret in leaks.items():
        out = redact(text)
        assert secret not in out and "***" in out, (text, out)
    # ordinary text (model ids, UIDs, hosts, numbers, the words "bearer" and "token") is kept
    plain = (
        "Error code: 400 - model gpt-4o-2024-08-06 rejected study 1.2.840.113619.2.55.3.604688 "
        "at relay.example:8443 (bearer tokens are required; token expired 2026-12-01)"
    )
    assert redact(plain) == plain
    assert redact.error(ValueError(f"Bearer {TEST_KEY}")) == "ValueError: Bearer ***"


def test_a_secret_never_reaches_a_log_line_even_through_a_third_party_logger():
    """The log hook scrubs every record the process makes: messages, arguments and tracebacks
    (a chained SDK error included), whatever logger or handler carries it."""
    from tasks.core.redact import register

    secret = "third-party-secret-9f8e7d6c5b4a"
    register(secret)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    sdk_logger = logging.getLogger("httpx.leaky-test")
    sdk_logger.addHandler(handler)
    sdk_logger.setLevel(logging.DEBUG)
    try:
        sdk_logger.debug("request headers: %s", {"authorization": f"Bearer {secret}"})
        sdk_logger.warning(f"inline {secret}")
        try:
            try:
                raise RuntimeError(f"401 echo: {secret}")
            except RuntimeError as exc:
                raise KeyError("upload failed") from exc
        except KeyError:
            sdk_logger.exception("upload failed")
    finally:
        sdk_logger.removeHandler(handler)
    text = stream.getvalue()
    assert secret not in text, text
    assert text.count("***") >= 3 and "RuntimeError: 401 echo: ***" in text


# ---- parse errors of input files name a position, never the content ---------------------------

AWS_CREDENTIALS = (
    f"[default]\naws_access_key_id = {FAKE_AWS_KEY_ID}\naws_secret_access_key = {FAKE_AWS_SECRET}\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # ~/.aws/credentials passed as --config
            AWS_CREDENTIALS,
            "line 2, column 1: expected '<document start>', but found '<scalar>'",
        ),
        (
            f"language: en\nmodels: *{FAKE_LIVE_KEY}\n",
            "line 2, column 9: found undefined alias '…'",
        ),
        (
            f"OPENAI_API_KEY: {FAKE_LIVE_KEY}\n\tlanguage: en\n",
            "line 2, column 1: while scanning for the next token; found character '\\t' that",
        ),
        (
            f"token: !{FAKE_LIVE_KEY} x\n",
            "line 1, column 8: could not determine a constructor for the tag '…'",
        ),
    ],
    ids=["aws-credentials", "alias", "tab", "tag"],
)
def test_yaml_error_names_line_and_column_never_the_content(tmp_path, text, expected):
    path = tmp_path / "credentials"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f'config "{path}" is not valid YAML at {expected}' in message, message
    for secret in (FAKE_AWS_KEY_ID, "wJalrXUtnFEMI", FAKE_LIVE_KEY[:16], "aws_access"):
        assert secret not in message, message
    print(f"\nRELIABILITY parse errors: {info.value.args[0].split(' is not valid YAML ')[1]}")


def test_a_config_that_is_not_text_is_one_clear_error(tmp_path):
    path = tmp_path / "key.der"
    path.write_bytes(b"0\x82\x04\xa4\x02\x01\x00\xff\xfe secret-bytes")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(invalid byte at offset 1\)"):
        load_settings(path)


def test_annotation_errors_do_not_echo_a_secret_file_line():
    """A .env or key file passed as annotations: its lines become CSV header names; unknown
    keys are named only when they look like column names."""
    data = f"OPENAI_API_KEY={FAKE_LIVE_KEY},diagnosys\nx,y\n".encode()
    _, rejected = parse_annotations(data, "secrets.csv")
    (bad,) = rejected
    assert "sk-live" not in bad.reason and "OPENAI_API_KEY" not in bad.reason, bad.reason
    assert "'diagnosys'" in bad.reason and "key 1 (43 characters, not shown" in bad.reason


# ---- api_key_env that names something other than an API key ------------------------------------


def test_api_key_env_that_is_not_key_like_warns_naming_model_and_variable(
    tmp_path, monkeypatch, caplog
):
    cloud = FAKE_AWS_SECRET
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", cloud)
    monkeypatch.setenv("DATABASE_URL", "postgres://admin:hunter2-db-secret@db/prod")
    models = [
        {"name": "a", "provider": "openai", "model": "m", "api_key_env": "AWS_SECRET_ACCESS_KEY"},
        {"name": "b", "provider": "openai", "model": "m", "api_key_env": "DATABASE_URL"},
        {"name": "c", "provider": "anthropic", "model": "m", "api_key_env": "RELAY_API_KEY"},
        {"name": "d", "provider": "openai", "model": "m", "api_key_env": "AZURE_OPENAI_API_KEY",
         "fallback": {"name": "e", "provider": "openai", "model": "m",
                      "api_key_env": "GOOGLE_APPLICATION_CREDENTIALS"}},
    ]  # fmt: skip
    path = tmp_path / "radflow.yaml"
    path.write_text(yaml.safe_dump({"models": models, "gateway": {"api_key_env": "GH_TOKEN"}}))
    with caplog.at_level(logging.WARNING, logger="tasks.core.config"):
        load_settings(path)
        load_settings(path)  # the CLI and then the flow load it: still one line each
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.core.config"]
    assert len(lines) == 3, lines
    assert 'model "a": api_key_env "AWS_SECRET_ACCESS_KEY" names a cloud credential' in lines[0]
    assert 'model "b": api_key_env "DATABASE_URL" does not look like an API key' in lines[1]
    assert 'model "e": api_key_env "GOOGLE_APPLICATION_CREDENTIALS" names a cloud' in lines[2]
    assert all("bearer token" in line for line in lines)
    text = "\n".join(lines)
    assert cloud not in text and "hunter2" not in text
    print(
        f"\nRELIABILITY api_key_env: 6 variables (gateway, 4 models, 1 fallback) → "
        f"{len(lines)} warnings (2 cloud credentials, 1 not key-like), 0 values logged"
    )


# ---- end to end: every kind of outbound call fails with an echoing 400/401/403 ----------------


def _api_texts() -> dict[str, str]:
    """Everything the harness's Prefect API holds that could carry a secret, as JSON text."""
    from prefect.client.orchestration import get_client

    async def read() -> dict[str, str]:
        out: dict[str, str] = {}
        async with get_client() as client:
            for name, reader in (
                ("artifacts", client.read_artifacts),
                ("logs", client.read_logs),
                ("flow runs", client.read_flow_runs),
                ("task runs", client.read_task_runs),
            ):
                items, offset = [], 0
                while page := await reader(limit=200, offset=offset):
                    items += [i.model_dump(mode="json") for i in page]
                    offset += len(page)
                out[name] = json.dumps(items, ensure_ascii=False)
        return out

    return asyncio.run(read())


def _model(name: str, provider: str, base_url: str, **extra) -> dict:
    return {"name": name, "provider": provider, "model": name, "base_url": base_url,
            "api_key_env": KEY_ENV, "extra_headers": {HEADER: TOKEN}, **extra}  # fmt: skip


def _run(*args: str, api_url: str) -> subprocess.CompletedProcess:
    """``radflow ARGS`` with the SDKs' debug logs on (what they log must be redacted too)."""
    return run_radflow(
        *args, api_url=api_url, env={"OPENAI_LOG": "debug", "ANTHROPIC_LOG": "debug"}
    )


@pytest.mark.e2e
def test_no_key_or_header_token_reaches_outputs_logs_api_or_summaries_when_every_call_fails(
    prefect_harness, simulator, tmp_path
):
    sim, leaky = simulator.url, simulator.url + "/leaky"
    images, uids = tmp_path / "images", []
    for i in range(12):
        uids.append(generate_uid(entropy_srcs=["secrets-suite", str(i)]))
        synthetic_ct(images / f"s{i:02d}.dcm", lesion=i % 2 == 0, seed=70 + i, size=64,
                     study_uid=uids[-1])  # fmt: skip
    studies = tmp_path / "studies"
    for i in range(2):
        studies.mkdir(exist_ok=True)
        (studies / f"s{i:02d}.dcm").write_bytes((images / f"s{i:02d}.dcm").read_bytes())
    panel = {
        "language": "en",
        "preprocess": {"max_edge": 64},
        "synthesis": {"model": "claude"},  # the impression: an echoing 400
        "models": [
            _model("gpt-4o", "openai", sim + "/v1"),  # answers: the reports exist
            _model("claude", "anthropic", leaky + "/400",  # reading: 400, fallback: 400
                   fallback=_model("claude-backup", "openai", leaky + "/400/v1")),
            _model("strict", "openai", leaky + "/400/v1"),  # reading: 400
        ],
    }  # fmt: skip
    config = tmp_path / "radflow.yaml"
    config.write_text(yaml.safe_dump(panel))
    # a 401 or 403 stops the run with one line naming the model (docs/models.md)
    stopping = tmp_path / "stopping.yaml"
    rejected = [
        _model("gpt-4o", "openai", sim + "/v1"),
        _model("claude", "anthropic", leaky + "/401"),
    ]
    stopping.write_text(yaml.safe_dump({**panel, "synthesis": None, "models": rejected}))
    upload_config = tmp_path / "upload.yaml"  # its first OpenAI model is the upload endpoint
    tuner = _model("tuner", "openai", leaky + "/403/v1")  # the Files API: 403
    upload_config.write_text(yaml.safe_dump({**panel, "synthesis": None, "models": [tuner]}))
    labels = tmp_path / "labels.csv"
    labels.write_text("study_instance_uid,abnormal\n" + f"{uids[0]},1\n{uids[1]},0\n")
    annotations = tmp_path / "annotations.csv"
    with annotations.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient_id", "abnormal"])
        writer.writerows([f"s{i:02d}.dcm", f"P{i}", i % 2] for i in range(12))

    dest, evaluated, dataset = tmp_path / "out", tmp_path / "eval", tmp_path / "dataset"
    api = prefect_harness
    commands = {
        "screen": ("screen", str(studies), "--out", str(dest), "--config", str(config)),
        "evaluate": ("evaluate", str(labels), "--images", str(studies), "--out",
                     str(evaluated), "--config", str(config)),
        "stopped": ("screen", str(studies), "--out", str(tmp_path / "stopped"), "--config",
                    str(stopping)),
        "upload": ("build-dataset", str(annotations), "--images", str(images), "--out",
                   str(dataset), "--config", str(upload_config), "--val-fraction", "0",
                   "--upload"),
    }  # fmt: skip
    # independent runs (own outputs, one shared API and simulator): at once, not in turn
    with ThreadPoolExecutor(len(commands)) as pool:
        done = pool.map(lambda args: _run(*args, api_url=api), commands.values())
        runs = dict(zip(commands, done, strict=True))
    assert runs["screen"].returncode == 0, runs["screen"].stderr[-3000:]
    assert runs["evaluate"].returncode == 0, runs["evaluate"].stderr[-3000:]
    assert runs["upload"].returncode == 2, runs["upload"].stderr[-3000:]

    logs = {f"{name} {stream}": getattr(run, stream)
            for name, run in runs.items() for stream in ("stdout", "stderr")}  # fmt: skip
    files = {str(p): p.read_bytes().decode("utf-8", "replace")
             for d in (dest, evaluated, dataset, tmp_path / "stopped") for p in d.rglob("*")
             if p.is_file()}  # fmt: skip
    api_texts = _api_texts()
    leaks = [
        (where, secret[:9])
        for texts in (logs, files, api_texts)
        for where, text in texts.items()
        for secret in (TEST_KEY, TOKEN)
        if secret in text
    ]
    assert leaks == [], "\n".join(map(str, leaks))
    # each kind of call failed with its echoing status, and the SDK error was kept, redacted
    report = json.loads(next(dest.glob("studies/*/report.json")).read_text())
    readings = {r["model"]: r for r in report["readings"]}
    assert readings["gpt-4o"]["ok"] and report["status"] == "degraded"
    claude, strict, impression = readings["claude"], readings["strict"], report["impression"]
    assert "400" in claude["primary_error"] and "***" in claude["primary_error"]
    assert "400" in claude["error"] and claude["fallback"] == "claude-backup"
    assert "400" in strict["error"] and "***" in strict["error"]
    assert not impression["ok"] and "400" in impression["error"] and "***" in impression["error"]
    assert runs["stopped"].returncode == 2, runs["stopped"].stderr[-3000:]
    [line] = [x for x in runs["stopped"].stderr.splitlines() if x.startswith("error:")]
    assert 'model "claude"' in line and f"env var {KEY_ENV}" in line and "401" in line
    assert not list((tmp_path / "stopped").glob("studies/*/report.json"))  # none marked done
    assert "403" in runs["upload"].stderr and "fine-tuning upload" in runs["upload"].stderr
    summaries = [p for d in (dest, evaluated) for p in d.glob("runs/*.json")]
    assert len(summaries) == 2 and (evaluated / "metrics.json").is_file()

    echoed = sum(t.count("***") for t in (*logs.values(), *files.values()))
    print(
        f"\nRELIABILITY secrets (every call kind): key + gateway token echoed by 401/403/400 "
        f"(readings 400, fallback 400, impression 400, a reading 401 stopping the run, "
        f"evaluation, fine-tune upload 403) → 0 occurrences in {len(files)} files (2 run summaries), "
        f"{sum(map(len, logs.values()))} chars of CLI output (SDK debug logs on), "
        f"{sum(map(len, api_texts.values()))} chars of Prefect artifacts, logs and runs; "
        f"{echoed} redactions"
    )
