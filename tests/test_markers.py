"""The e2e mark is honest: a test not marked e2e cannot start a program, a process pool's
worker or a server (the guard in tests/conftest.py); a test marked e2e can."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest


def test_an_unmarked_test_cannot_start_a_program():
    with pytest.raises(RuntimeError, match=r"test_markers\.py::test_an_unmarked_test_cannot_star"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_an_unmarked_test_cannot_start_a_process_pool_worker():
    spawn = multiprocessing.get_context("spawn")  # as radflow's pool (tasks/screening/pool.py)
    with (
        pytest.raises(RuntimeError, match="starts a process.*not marked e2e"),
        ProcessPoolExecutor(1, mp_context=spawn) as pool,
    ):
        pool.submit(len, "ab").result(timeout=60)


def test_an_unmarked_test_cannot_listen_on_a_port():
    with socket.socket() as sock, pytest.raises(RuntimeError, match="listens on.*not marked e2e"):
        sock.bind(("127.0.0.1", 0))


@pytest.mark.e2e
def test_a_test_marked_e2e_may_start_a_program():
    run = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "42\n")
