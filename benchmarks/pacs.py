"""The same studies screened from a PACS over DICOMweb (a real Orthanc on loopback) and from a
folder: wall time and bytes per study. Models are the simulator (a TEST DOUBLE, no latency
added), so the difference is the source: searches, metadata, retrieves vs local reads.

    make bench-pacs
    .venv/bin/python -m benchmarks.pacs [--studies 4] [--slices 300] [--size 256] [--repeat 2]

s/study is the best run's wall time (discovery, reading, reports) divided by the studies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import requests
import yaml
from dicomweb_client import DICOMwebClient

from simulator.orthanc import orthanc_missing, running_orthanc
from simulator.process import panel_config, running_simulator
from simulator.samples import synthetic_ct

__all__ = ["main"]

KEY_ENV, USER_ENV, PASSWORD_ENV = "RADFLOW_BENCH_KEY", "RADFLOW_BENCH_USER", "RADFLOW_BENCH_PW"


def build(root: Path, studies: int, slices: int, size: int) -> list[Path]:
    """``studies`` synthetic CT series of ``slices`` slices each (one patient per study)."""
    paths = []
    for s in range(studies):
        uid = f"1.2.826.0.1.3680043.10.557.{s + 1}"
        for i in range(slices):
            paths.append(
                synthetic_ct(
                    root / f"study-{s}" / f"{i:04d}.dcm",
                    lesion=s % 2 == 0 and i > slices // 3,
                    seed=s * 10_000 + i,
                    size=size,
                    study_uid=uid,
                    series_uid=f"{uid}.1",
                    instance=i + 1,
                    phi={"PatientID": f"BENCH-{s}", "PatientName": f"BENCH^{s}"},
                )
            )
    return paths


def upload(orthanc, paths: list[Path]) -> float:
    session = requests.Session()
    session.auth = (orthanc.user, orthanc.password)
    web = DICOMwebClient(orthanc.url + "/dicom-web", session=session)
    started = time.perf_counter()
    batch = 25
    for k in range(0, len(paths), batch):
        web.store_instances([pydicom.dcmread(p) for p in paths[k : k + batch]])
    return time.perf_counter() - started


def screen_once(source: str, dest: Path, config: Path) -> tuple[float, object]:
    from flows.screen import screen

    started = time.perf_counter()
    summary = asyncio.run(screen(source, str(dest), str(config)))
    return time.perf_counter() - started, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="slice size in pixels")
    parser.add_argument("--repeat", type=int, default=2, help="runs per source (fresh DEST)")
    args = parser.parse_args(argv)
    missing = orthanc_missing()
    if missing:
        print(f"bench-pacs needs Orthanc: {missing}", file=sys.stderr)
        return 2
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory(prefix="radflow-bench-pacs-") as tmp:
        root = Path(tmp)
        paths = build(root / "studies", args.studies, args.slices, args.size)
        study_bytes = sum(p.stat().st_size for p in paths) / args.studies
        with (
            running_orthanc(stable_age=60) as orthanc,
            running_simulator("--seed", "1") as sim,
            prefect_test_harness(server_startup_timeout=120),
        ):
            os.environ |= {KEY_ENV: "bench-key", USER_ENV: orthanc.user}
            os.environ[PASSWORD_ENV] = orthanc.password
            stow_s = upload(orthanc, paths)
            auth = {"auth": "basic", "username_env": USER_ENV, "password_env": PASSWORD_ENV}
            config = root / "radflow.yaml"
            models = panel_config(sim.url, KEY_ENV)
            config.write_text(
                yaml.safe_dump({"language": "en", "models": models, "dicomweb": auth})
            )
            screen_once(str(root / "studies" / "study-0"), root / "warm-up", config)
            sources = {"folder": str(root / "studies"), "dicomweb": orthanc.dicomweb}
            rows: dict[str, list] = {name: [] for name in sources}
            for r in range(args.repeat):  # alternating order: folder, PACS, PACS, folder, ...
                for name in list(sources)[:: 1 if r % 2 == 0 else -1]:
                    dest = root / f"out-{name}-{r}"
                    seconds, summary = screen_once(sources[name], dest, config)
                    assert summary.reported == args.studies, (name, summary)
                    rows[name].append((seconds, summary))
    print(
        f"\nbench-pacs {datetime.now(UTC):%Y-%m-%d}: {args.studies} studies x {args.slices} "
        f"slices of {args.size}² (CT, {study_bytes / 2**20:.1f} MiB per study), key images "
        f"'middle', simulator models (a test double), {os.cpu_count()} CPUs; STOW-RS upload "
        f"took {stow_s:.1f} s"
    )
    header = f"{'source':<9} {'wall s, each run':>18} {'s/study':>8} {'fetched/study':>14}"
    print(header + f" {'metadata/study':>15}")
    for name, runs in rows.items():
        best, summary = min(runs, key=lambda run: run[0])
        each = ", ".join(f"{seconds:.1f}" for seconds, _ in runs)
        fetched = summary.fetched_bytes / args.studies
        meta = summary.discovery_bytes / args.studies
        print(
            f"{name:<9} {each:>18} {best / args.studies:8.2f} "
            f"{fetched / 2**10:10.0f} KiB {meta / 2**10:11.0f} KiB"
        )
    print(
        "fetched = bytes of the source instances read to render the key images; metadata = "
        "what the PACS sent to find and list the studies (QIDO-RS + WADO-RS metadata; a "
        "folder's header reads are local and not counted)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
