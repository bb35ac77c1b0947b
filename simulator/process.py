"""Run the simulator as its own process on a free loopback port (demo, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

__all__ = ["SimulatorProcess", "free_port", "running_simulator"]


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


@contextlib.contextmanager
def running_simulator(
    *args: str, port: int | None = None, wait: float = 30.0
) -> Iterator[SimulatorProcess]:
    """Start ``radflow simulator`` with ``args``; wait until /health answers; stop it after."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--quiet",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"simulator exited with {proc.returncode}: {err.strip()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulator did not answer on {url} within {wait:.0f} s")
            time.sleep(0.1)
        yield SimulatorProcess(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
