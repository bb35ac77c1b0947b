"""Reliability and security figures in one run: runs the suite's scenario tests (each starts
its own simulator, moto_server, Prefect API and `radflow screen` processes on loopback) and
prints, per point, what was tried and the outcome each test measured and asserted.

    python -m benchmarks.reliability
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

# point → the test that proves it (pytest node ids, relative to the repo root)
POINTS = {
    "1. hostile inputs": [
        "tests/test_reliability.py::"
        "test_hostile_inputs_each_get_one_error_record_and_good_studies_are_reported",
        "tests/test_reliability.py::test_untrusted_sizes_are_checked_before_any_allocation",
        "tests/test_reliability.py::test_a_file_cut_anywhere_is_one_clear_error_never_a_crash",
    ],
    "2. provider faults": [
        "tests/test_models.py::test_screen_with_25_percent_faults_reports_everything_once"
    ],
    "3. storage faults": ["tests/test_s3.py::test_transient_errors_are_retried_then_reported"],
    "4. crash and resume": [
        "tests/test_reliability.py::"
        "test_sigkill_mid_run_then_resume_reports_each_study_once_and_asks_nothing_twice"
    ],
    "5-7. PHI, prompt injection, secrets": [
        "tests/test_reliability.py::"
        "test_no_phi_injection_or_key_reaches_requests_logs_artifacts_or_outputs"
    ],
    "PHI guard: context vocabulary, burned-in flag": [
        "tests/test_phi.py::test_free_text_in_coded_fields_never_reaches_a_request_and_is_counted",
        "tests/test_context.py::test_at_most_max_values_terms_per_field_reach_the_prompt",
        "tests/test_preprocess.py::test_burned_in_policy",
    ],
    "identifiers in logs, artifacts, run names (log ids)": [
        "tests/test_reliability.py::"
        "test_no_phi_injection_or_key_reaches_requests_logs_artifacts_or_outputs",
        "tests/test_privacy.py::test_a_log_id_maps_back_only_with_the_key",
    ],
    "secrets in every outbound call, parse errors, api_key_env": [
        "tests/test_secrets.py::"
        "test_no_key_or_header_token_reaches_outputs_logs_api_or_summaries_when_every_call_fails",
        "tests/test_secrets.py::test_redactor_replaces_known_secrets_and_token_shaped_strings",
        "tests/test_secrets.py::"
        "test_a_secret_never_reaches_a_log_line_even_through_a_third_party_logger",
        "tests/test_secrets.py::test_yaml_error_names_line_and_column_never_the_content",
        "tests/test_secrets.py::test_annotation_errors_do_not_echo_a_secret_file_line",
        "tests/test_secrets.py::"
        "test_api_key_env_that_is_not_key_like_warns_naming_model_and_variable",
    ],
    "parser failures: one object, one record, no retries": [
        "tests/test_reliability.py::"
        "test_a_file_that_breaks_the_parser_fails_only_itself_and_is_never_retried"
    ],
    "decoding memory budget": [
        "tests/test_budget.py::"
        "test_decoding_memory_stays_within_the_budget_in_threads_and_in_the_pool"
    ],
    "runs sharing a DEST (claims), symlinks out of SOURCE/DEST": [
        "tests/test_claims.py::test_two_runs_at_once_read_each_study_once",
        "tests/test_claims.py::"
        "test_claims_of_a_crashed_run_are_taken_over_and_a_live_runs_are_left",
        "tests/test_claims.py::test_racing_threads_get_one_claim",
        "tests/test_privacy.py::test_runs_that_start_at_once_on_a_new_dest_share_one_key",
        "tests/test_symlinks.py::test_screen_refuses_symlinks_out_of_source_and_dest",
    ],
}
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    tests = list(dict.fromkeys(t for ts in POINTS.values() for t in ts))  # a test may prove two
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rA", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    out = run.stdout
    figures = [line.removeprefix("RELIABILITY ") for line in out.splitlines()
               if line.startswith("RELIABILITY ")]  # fmt: skip
    outcome = {
        m.group(2): m.group(1) for m in re.finditer(r"^(PASSED|FAILED|ERROR) (\S+)", out, re.M)
    }
    for point, ids in POINTS.items():
        print(point)
        for test in ids:
            states = {k: v for k, v in outcome.items() if k.split("[")[0] == test}
            state = ", ".join(sorted(set(states.values()))) or "NOT RUN"
            print(f"  {state:<7} {test.split('::')[1]}")
    print("\nfigures (measured in this run):")
    for line in figures:
        print(f"  {line}")
    print(f"\n{len(outcome)} test runs in {elapsed:.0f} s, pytest exit {run.returncode}")
    if run.returncode != 0:
        print(out[-4000:], run.stderr[-2000:], sep="\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
