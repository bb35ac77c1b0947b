"""CPU per DICOM SR: radflow's ``build_sr`` against highdicom's ``ComprehensiveSR`` constructor
on the same content trees (tests/sr_reference.py), and the Part 10 encoding (``sr_bytes``),
in one process, alternating round by round; process CPU, median of the rounds. Also a whole
report (``write_report`` to a temporary folder: report.json/.md, SR, FHIR; no key images) with
either builder.

    .venv/bin/python -m benchmarks.sr [--rounds 5] [--profile]

Two sets of 40 reports: "typical" (the simulator panel's CT report, one key image, as in
bench-screen) and "branches" (tests/sr_reference.py's cases, cycled: Korean, multi-frame,
several evidence objects, predecessors, long text).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tasks.reports.write as write
from tasks.reports.sr import build_sr, content_tree, sr_bytes, warm_up
from tasks.storage import LocalStore
from tests.sr_reference import SrCase, highdicom_sr, sr_cases

__all__ = ["main"]

N = 40


def _sets() -> dict[str, list[SrCase]]:
    cases = sr_cases()
    typical = cases[0]
    return {
        "typical": [
            SrCase(
                f"typical-{i}",
                typical.report.model_copy(update={"prompt_version": f"v{i}"}),
                typical.evidence,
            )
            for i in range(N)
        ],
        "branches": [cases[i % len(cases)] for i in range(N)],
    }


def _radflow(case: SrCase):
    return build_sr(case.report, case.evidence, case.previous, case.instance_number)


def _highdicom(case: SrCase):
    return _highdicom_build(case.report, case.evidence, case.previous, case.instance_number)


def _tree(case: SrCase):
    return content_tree(case.report, {ds.SOPInstanceUID: ds for ds in case.evidence})


def _reports(builder: Callable) -> Callable[[SrCase], None]:
    """``write_report`` of a case into a new folder, its SR made by ``builder``."""

    def run(case: SrCase) -> None:
        saved, write.build_sr = write.build_sr, builder
        try:
            with tempfile.TemporaryDirectory() as folder:
                write.write_report(
                    LocalStore(Path(folder)), case.report.model_copy(), {}, case.evidence
                )
        finally:
            write.build_sr = saved

    return run


def _highdicom_build(report, evidence, previous=(), instance_number=1):
    """``build_sr`` as it was before 2026-12-04: highdicom's constructor."""
    by_sop = {ds.SOPInstanceUID: ds for ds in evidence}
    return highdicom_sr(report, content_tree(report, by_sop), evidence, previous, instance_number)


def _ms_each(fn: Callable, cases: list[SrCase], encode: bool = False) -> float:
    start = time.process_time()
    for case in cases:
        sr = fn(case)
        if encode:
            sr_bytes(sr)
    return (time.process_time() - start) / len(cases) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one round of each")
    args = parser.parse_args()
    warm_up()
    sets = _sets()
    for name, cases in sets.items():
        _highdicom(cases[0]), _radflow(cases[0])  # each path's first call, not timed
        runs: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for label, fn, encode in (
                ("content tree only", _tree, False),
                ("tree + highdicom ctor", _highdicom, False),
                ("tree + radflow build_sr", _radflow, False),
                ("highdicom + sr_bytes", _highdicom, True),
                ("radflow + sr_bytes", _radflow, True),
                ("report, highdicom SR", _reports(_highdicom_build), False),
                ("report, radflow SR", _reports(build_sr), False),
            ):
                runs.setdefault(label, []).append(_ms_each(fn, cases, encode))
        print(f"{name} ({len(cases)} reports, {args.rounds} rounds, process CPU, median ms/SR):")
        for label, values in runs.items():
            print(f"  {label:<24} {statistics.median(values):6.2f} ms  (min {min(values):.2f})")
        old, new = (
            statistics.median(runs[k]) for k in ("highdicom + sr_bytes", "radflow + sr_bytes")
        )
        print(f"  built and encoded: {old:.2f} → {new:.2f} ms, {old / new:.1f}x less CPU")
        old, new = (
            statistics.median(runs[k]) for k in ("report, highdicom SR", "report, radflow SR")
        )
        print(f"  whole report: {old:.2f} → {new:.2f} ms")
        if args.profile:
            for label, fn in (("highdicom", _highdicom), ("radflow", _radflow)):
                profile = cProfile.Profile()
                profile.enable()
                _ms_each(fn, cases, encode=True)
                profile.disable()
                print(f"--- profile: {label} + sr_bytes, {name}")
                pstats.Stats(profile).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
