"""Shared fixtures: one Prefect harness, one simulator process and one sample folder per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simulator.process import panel_config, running_simulator
from simulator.samples import build_sample_folder

KEY_ENV = "RADFLOW_TEST_KEY"
TEST_KEY = "test-key-0123456789abcdef-never-logged"


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (the test harness runs a server on loopback with a temp database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def simulator():
    """The model simulator as its own process, speaking HTTP on a free loopback port."""
    with running_simulator("--seed", "3", "--record-bodies") as sim:
        yield sim


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 wire protocol: ``moto_server`` as its own process on a free loopback port.
    boto3 reaches it through AWS_ENDPOINT_URL with fake credentials for the whole session."""
    import sys

    from simulator.process import free_port, serving

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("moto_server")
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
        with serving(cmd, url + "/moto-api/", name="moto_server"):
            yield url


@pytest.fixture(scope="module")
def orthanc():
    """A real Orthanc (DICOMweb plugin, authentication on, StableAge 3 s) as its own process
    on a free loopback port, one per test module (its studies are the module's own)."""
    from simulator.orthanc import orthanc_missing, running_orthanc

    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    with running_orthanc(stable_age=3) as server:
        yield server


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    build_sample_folder(root, synthetic=4)
    return root


@pytest.fixture(autouse=True)
def _test_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, TEST_KEY)


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
    """Environment for a `radflow` subprocess using the harness's Prefect API."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    env[KEY_ENV] = TEST_KEY
    return env


def read_reports(dest: Path) -> dict:
    """Every report.json under a local DEST, by StudyInstanceUID."""
    from tasks.core.schema import Report

    return {
        p.parent.name: Report.model_validate_json(p.read_text())
        for p in dest.glob("studies/*/report.json")
    }


def sim_calls(sim) -> int:
    """Requests the simulator has received so far, all models together."""
    return sum(sim.stats()["requests"].values())
