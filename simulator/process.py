"""Run servers (the simulator, moto, Prefect) as their own processes on free loopback ports."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

__all__ = [
    "SimulatorProcess",
    "free_port",
    "panel_config",
    "running_simulator",
    "serving",
    "stop",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SimulatorProcess:
    url: str  # base URL without /v1
    process: subprocess.Popen

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=10).json()

    def bodies(self) -> dict[str, list[str]]:
        return httpx.get(self.url + "/bodies", timeout=30).json()


def panel_config(url: str, key_env: str, max_concurrency: int = 8) -> list[dict]:
    """The config's ``models``: an OpenAI and an Anthropic model, both pointed at the simulator
    at ``url`` (as a user points them at a gateway), with the key read from ``key_env``."""
    common = {"api_key_env": key_env, "max_concurrency": max_concurrency}
    return [
        {"name": "gpt-4o", "provider": "openai", "model": "gpt-4o", "base_url": url + "/v1",
         "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}, **common},
        {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-6", "base_url": url,
         "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}, **common},
    ]  # fmt: skip


@contextlib.contextmanager
def serving(
    cmd: list[str],
    health_url: str,
    *,
    name: str,
    env: dict[str, str] | None = None,
    wait: float = 60.0,
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` as its own process until ``health_url`` answers 200; stop it afterwards.

    Its output goes to a temporary file (a pipe would fill up and block it); the file's tail
    is quoted when the process exits before answering."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + wait
            while True:  # start-up polling with a deadline, not synchronisation of a test
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:].strip()
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {tail}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(health_url, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not answer on {health_url} within {wait:.0f} s")
                time.sleep(0.1)
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_simulator(
    *args: str, port: int | None = None, wait: float = 30.0
) -> Iterator[SimulatorProcess]:
    """Start ``radflow simulator`` with ``args``; wait until /health answers; stop it after."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "flows.cli", "simulator", "--host", "127.0.0.1",
           "--port", str(port), "--quiet", *args]  # fmt: skip
    with serving(cmd, url + "/health", name="simulator", wait=wait) as proc:
        yield SimulatorProcess(url, proc)
