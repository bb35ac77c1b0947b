"""Shared test helpers (conftest.py holds the fixtures): the simulator panel's config, `radflow`
as a user runs it (one subprocess helper), long-running processes and polling, report and
reading factories, and readers of what a run left under DEST."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from simulator.process import free_port, panel_config, stop
from tasks.consensus.vote import build_consensus
from tasks.core.config import ReviewConfig, Settings
from tasks.core.schema import Consensus, ModelReading, Report, Urgency

__all__ = [
    "BIN",
    "FAULTY_MODELS",
    "KEY_ENV",
    "PASSWORD_ENV",
    "RADFLOW",
    "ROOT",
    "SERVER_SETTINGS",
    "TEST_KEY",
    "USER_ENV",
    "child_env",
    "dicomweb_client",
    "make_report",
    "pacs_config",
    "panel_readings",
    "prefect_api",
    "prefect_server_process",
    "process",
    "read_errors",
    "read_many",
    "read_reports",
    "reading",
    "run_radflow",
    "run_screen",
    "sim_calls",
    "sr_instances",
    "sim_config",
    "sim_model",
    "sim_settings",
    "tail",
    "tiny_png",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY_ENV = "RADFLOW_TEST_KEY"
# model id → the fault the `faulty_simulator` fixture always injects for it
FAULTY_MODELS = {
    "refuses": "refusal",
    "refuses-in-text": "text_refusal",
    "cut-short": "length",
    "overloaded": "529",
    "no-usage": "no_usage",
    "bad-key": "401",
    "forbidden": "403",
    "unknown-model": "404",
    "rejects-image": "bad_image",
    "no-json-schema": "no_json_schema",
}
TEST_KEY = "test-key-0123456789abcdef-never-logged"
USER_ENV, PASSWORD_ENV = "RADFLOW_TEST_PACS_USER", "RADFLOW_TEST_PACS_PASSWORD"
# `radflow` as a new process: the console script's own entry point, whatever is on PATH
RADFLOW = [sys.executable, "-m", "flows.cli"]

# The server settings of docs/deploy.md ("Prefect server settings"): persist events and task runs within ~1 s
# so the UI and the checks see them promptly.
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    # not exercised here: fewer loops competing for the CPU
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
}


# ---- config and environment -----------------------------------------------------------------


def sim_config(sim, tmp_path: Path, language: str = "en", **extra) -> Path:
    """A config pointing an OpenAI and an Anthropic model at the simulator."""
    import yaml

    config = {
        "language": language,
        "models": panel_config(sim.url, KEY_ENV),
        **extra,
    }
    path = tmp_path / "radflow.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def child_env(api_url: str) -> dict[str, str]:
    """Environment for a `radflow` subprocess using the Prefect API at ``api_url``."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    env[KEY_ENV] = TEST_KEY
    return env


def pacs_config(sim, tmp_path: Path, **extra) -> str:
    """``sim_config`` reading from a PACS with basic auth (credentials in USER_ENV and
    PASSWORD_ENV) and short DICOMweb retry waits."""
    auth = {"auth": "basic", "username_env": USER_ENV, "password_env": PASSWORD_ENV}
    extra.setdefault("dicomweb", {}).update(auth | {"retry_wait_ms": 50})
    return str(sim_config(sim, tmp_path, **extra))


# ---- processes ------------------------------------------------------------------------------


def run_radflow(
    *args: str,
    api_url: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``radflow ARGS`` as a user runs it: a new process in the repository root, its output
    captured as text. With ``api_url``, against that Prefect API (``child_env``, updated by
    ``env``); with ``env`` alone, exactly that environment; with neither, this one's."""
    if api_url is not None:
        env = child_env(api_url) | (env or {})
    return subprocess.run(
        [*RADFLOW, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def run_screen(
    source: Path | str,
    dest: Path | str,
    config: Path | str | None = None,
    *extra: str,
    api_url: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``radflow screen SOURCE --out DEST [--config CONFIG] EXTRA...`` through ``run_radflow``."""
    args = ["screen", str(source), "--out", str(dest)]
    args += ["--config", str(config)] if config is not None else []
    return run_radflow(*args, *extra, api_url=api_url, env=env, timeout=timeout)


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``cmd`` running in the repository root, its output in ``log``; stopped afterwards."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop(proc)


def tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a process's log (for an assertion's message)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120, every: float = 0.3) -> Any:
    """Poll ``check`` until it returns something truthy (external state: a server, a file),
    and return that; a ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return value


def prefect_cli(env: dict[str, str], *args: str) -> str:
    """``prefect ARGS`` (no prompts) in the repository root; its output, asserted to succeed."""
    proc = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def prefect_api(env_or_url: dict[str, str] | str, method: str, path: str, **kw: Any) -> Any:
    """One Prefect API call (``env_or_url``: a client's environment or the API URL); a 503
    (the server's SQLite busy under load) is retried with back-off, as Prefect's client does."""
    url = env_or_url if isinstance(env_or_url, str) else env_or_url["PREFECT_API_URL"]
    for attempt in range(5):
        answer = httpx.request(method, url + path, timeout=30, **kw)
        if answer.status_code != 503 or attempt == 4:
            break
        time.sleep(0.5 * 2**attempt)
    answer.raise_for_status()
    return answer.json() if answer.content else None


@contextlib.contextmanager
def prefect_server_process(
    home: Path, settings: dict[str, str] = SERVER_SETTINGS
) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite);
    yields the environment of a client of it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= settings | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = home / "server.log"
    with process([str(BIN / "prefect"), "server", "start"], env, log) as proc:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {tail(log)}")
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("prefect server /api/health", healthy, timeout=240)
        yield env


# ---- what a run leaves under DEST ----------------------------------------------------------


def read_reports(dest: Path) -> dict[str, Report]:
    """Every report.json under a local DEST, by StudyInstanceUID."""
    return {
        p.parent.name: Report.model_validate_json(p.read_text())
        for p in dest.glob("studies/*/report.json")
    }


def read_errors(dest: Path) -> list[dict]:
    """Every error record under a local DEST, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted(dest.glob("errors/*.json"))]


def sim_calls(sim) -> int:
    """Requests the simulator has received so far, all models together."""
    return sum(sim.stats()["requests"].values())


def dicomweb_client(orthanc):
    """A DICOMweb client of the test Orthanc, logged in."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.auth = (orthanc.user, orthanc.password)
    return DICOMwebClient(orthanc.url + "/dicom-web", session=session)


def sr_instances(orthanc, study: str) -> list:
    """radflow's SR instances (pydicom datasets) of the study in Orthanc, retrieved whole."""
    from tasks.reports.sr import sr_series_uid

    web = dicomweb_client(orthanc)
    series = sr_series_uid(study)
    found = web.search_for_instances(study, series)
    sops = sorted(item["00080018"]["Value"][0] for item in found)
    return [web.retrieve_instance(study, series, sop) for sop in sops]


# ---- factories ------------------------------------------------------------------------------


def reading(
    model: str,
    abnormal: bool | None,
    urgency: str | None = None,
    ok: bool = True,
    findings: list[str] | None = None,
) -> ModelReading:
    """One model's reading; a successful one's urgency follows ``abnormal`` unless given."""
    if ok and urgency is None:
        urgency = "follow_up" if abnormal else "normal"
    return ModelReading(
        model=model,
        provider="openai",
        model_id=model,
        ok=ok,
        abnormal=abnormal,
        urgency=Urgency(urgency) if urgency else None,
        findings=findings or [],
        error=None if ok else "boom",
    )


def panel_readings(disagree: bool = True) -> list[ModelReading]:
    """The simulator panel's two readings of a nodule: gpt-4o calls it, claude disagrees
    (or, with ``disagree=False``, agrees)."""
    return [
        ModelReading(
            model="gpt-4o",
            provider="openai",
            model_id="gpt-4o",
            ok=True,
            abnormal=True,
            urgency=Urgency.FOLLOW_UP,
            findings=["Nodule in the right upper lobe"],
            recommended_exams=["CT follow-up in 3 months"],
            response_model="gpt-4o-2024-08-06",
        ),
        ModelReading(
            model="claude",
            provider="anthropic",
            model_id="claude-sonnet-4-6",
            ok=True,
            abnormal=not disagree,
            urgency=Urgency.NORMAL if disagree else Urgency.FOLLOW_UP,
            findings=[] if disagree else ["nodule in the right upper lobe"],
        ),
    ]


def make_report(
    uid: str,
    readings: list[ModelReading] | None = None,
    consensus: Consensus | None = None,
    **fields: Any,
) -> Report:
    """A complete English report of study ``uid``: the readings (none by default), their
    consensus unless one is given, no images; ``fields`` set or override any other field."""
    readings = readings or []
    return Report(
        **{
            "study_instance_uid": uid,
            "status": "complete",
            "language": "en",
            "consensus": consensus or build_consensus(readings, {}, ReviewConfig()),
            "readings": readings,
            "images": [],
            "inputs_fingerprint": "f" * 64,
            "prompt_version": "v1-test",
            "radflow_version": "0.1.0",
        }
        | fields
    )


# ---- the model layer against the simulator ------------------------------------------------


def tiny_png(i: int) -> bytes:
    """A small distinct image per ``i`` (distinct request bodies draw distinct faults)."""
    img = Image.new("L", (64, 64), color=i % 256)
    img.putpixel((i % 64, (i // 64) % 64), 255 - i % 256)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def sim_model(sim, provider: str, name: str | None = None, **extra) -> dict:
    """A config model entry of ``provider`` pointed at the simulator ``sim``."""
    base_url = sim.openai_base_url if provider == "openai" else sim.url
    model = "gpt-4o" if provider == "openai" else "claude-sonnet-4-6"
    return {
        "name": name or provider,
        "provider": provider,
        "model": model,
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        **extra,
    }


def sim_settings(*models: dict, **extra) -> Settings:
    """English settings with ``models``."""
    return Settings.model_validate({"language": "en", "models": list(models), **extra})


async def read_many(settings: Settings, n: int, cache=None, offset=0) -> list[list[ModelReading]]:
    """Read ``n`` distinct one-image studies with a Panel of ``settings``, all at once."""
    from tasks.models.panel import Panel, load_prompt

    panel = Panel(settings, cache)
    try:
        return list(
            await asyncio.gather(
                *(
                    panel.read([tiny_png(offset + i)], {"modality": "CT"}, load_prompt("en"))
                    for i in range(n)
                )
            )
        )
    finally:
        await panel.aclose()
