"""Fixtures: one Prefect harness, one simulator process, one moto_server and one sample folder
per session, an Orthanc per module; and the guard that keeps the e2e mark honest (helpers the
tests share are in tests/helpers.py).

The guard: a test not marked ``e2e`` may neither use a server fixture (it fails at set-up) nor
start a process (a program, a process pool's worker) or listen on a TCP/UDP port while it runs
(the attempt raises ``ServerOutsideE2E``), so ``make test-unit`` (``-m "not e2e"``) starts no
server and no subprocess. It watches the audit events of PEP 578; multiprocessing starts its
spawn and forkserver processes without one, so ``multiprocessing.util.spawnv_passfds`` is
wrapped to raise one first (it does nothing else)."""

from __future__ import annotations

import functools
import multiprocessing.util
import sys
from pathlib import Path

import pytest

from simulator.process import running_simulator
from simulator.samples import build_sample_folder
from tests.helpers import FAULTY_MODELS, KEY_ENV, TEST_KEY

# fixtures that start a server process; a test using one (directly or through another
# fixture) must be marked e2e
SERVER_FIXTURES = frozenset(
    {"prefect_harness", "simulator", "faulty_simulator", "moto_server", "orthanc"}
)
# audit events (PEP 578) of starting a process ("multiprocessing.spawn" is raised by the
# wrapper below); socket.bind with an address tuple is a TCP/UDP server (an AF_UNIX bind,
# e.g. multiprocessing's, names a path)
_SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.spawn", "os.fork"}
    | {"multiprocessing.spawn"}
)
_unmarked: str | None = None  # the running test's node id while it is not marked e2e


class ServerOutsideE2E(RuntimeError):
    """A test not marked e2e started a process or a server."""


def _guard(event: str, args: tuple) -> None:
    if _unmarked is None:
        return
    if event in _SPAWN_EVENTS:
        what = f"starts a process ({event} {args!r:.120})"
    elif event == "socket.bind" and isinstance(args[1], tuple):
        what = f"listens on {args[1]!r}"
    else:
        return
    raise ServerOutsideE2E(
        f"{_unmarked} {what} but is not marked e2e: mark it @pytest.mark.e2e "
        "(`make test-unit` starts no server and no subprocess)"
    )


def _audited(spawnv_passfds):
    @functools.wraps(spawnv_passfds)
    def spawn(path, args, passfds):
        sys.audit("multiprocessing.spawn", path, args)
        return spawnv_passfds(path, args, passfds)

    return spawn


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_guard)  # cannot be removed: it is idle whenever no unmarked test runs
    multiprocessing.util.spawnv_passfds = _audited(multiprocessing.util.spawnv_passfds)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _unmarked
    _unmarked = None if item.get_closest_marker("e2e") else item.nodeid
    try:
        return (yield)
    finally:
        _unmarked = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    servers = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if servers and item.get_closest_marker("e2e") is None:
        pytest.fail(
            f"{item.nodeid} uses {', '.join(sorted(servers))} but is not marked e2e: "
            "mark it @pytest.mark.e2e",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (the test harness runs a server on loopback with a temp database).
    Its telemetry is off: no heartbeat to the internet, no write competing for the SQLite."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.settings import PREFECT_API_URL

            yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def simulator():
    """The model simulator as its own process, speaking HTTP on a free loopback port."""
    with running_simulator("--seed", "3", "--record-bodies") as sim:
        yield sim


@pytest.fixture(scope="session")
def faulty_simulator():
    """A simulator process where each model id of ``FAULTY_MODELS`` always has its fault."""
    spec = ",".join(f"{fault}:1@{model}" for model, fault in FAULTY_MODELS.items())
    with running_simulator("--faults", spec, "--record-bodies") as sim:
        yield sim


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 wire protocol: ``moto_server`` as its own process on a free loopback port.
    boto3 reaches it through AWS_ENDPOINT_URL with fake credentials for the whole session."""
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
