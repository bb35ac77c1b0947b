"""deployments/prefect.yaml as `radflow serve` reads it: anchors expanded, schedules with their
timezone, the upload trigger and its templated parameters, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.serve import DEFAULT_PREFECT_FILE, load_deployment_specs, runner_deployments
from tasks.core.errors import ConfigError


def test_the_yaml_expands_anchors_and_keeps_secrets_as_block_references():
    specs = {s["name"]: s for s in load_deployment_specs()}
    assert {"nightly", "on-upload", "weekly-evaluation", "build-dataset"} <= set(specs)
    nightly = specs["nightly"]
    assert nightly["entrypoint"] == "flows/screen.py:screen"  # from the &screen anchor
    assert nightly["work_pool"] == {
        "name": "radflow",
        "work_queue_name": "screening",
        "job_variables": {
            "env": {
                "OPENAI_API_KEY": "{{ prefect.blocks.secret.radflow-openai-api-key }}",
                "ANTHROPIC_API_KEY": "{{ prefect.blocks.secret.radflow-anthropic-api-key }}",
                "RADFLOW_CONFIG": "/etc/radflow/radflow.yaml",
            }
        },
    }
    assert "sk-" not in DEFAULT_PREFECT_FILE.read_text()


def test_serve_builds_the_same_schedules_triggers_and_limits():
    served = {d.name: d for d in runner_deployments(only=["nightly", "on-upload"])}
    assert set(served) == {"nightly", "on-upload"}
    (schedule,) = served["nightly"].schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Asia/Seoul"
    assert served["nightly"].concurrency_limit == 1
    assert served["nightly"].entrypoint == "flows.screen.screen"
    (trigger,) = served["on-upload"].triggers
    assert trigger.expect == {"radflow.study.ready"}
    assert trigger.parameters == {
        "source": "s3://{{ event.payload.bucket }}/{{ event.payload.prefix }}",
        "keys": "{{ event.payload.names }}",
    }
    assert served["on-upload"].concurrency_limit == 4
    assert served["on-upload"].concurrency_options.collision_strategy == "ENQUEUE"


def test_bad_files_and_names_fail_with_one_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no deployment named \\['nope'\\]"):
        runner_deployments(only=["nope"])
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read deployments file"):
        load_deployment_specs(missing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: x\n")
    with pytest.raises(ConfigError, match="has no `deployments` list"):
        load_deployment_specs(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments:\n  - name: a\n    entrypoint: flows/nothing.py:flow\n")
    with pytest.raises(ConfigError, match="flows/nothing.py:flow.* cannot be loaded"):
        runner_deployments(bad)
    trigger = tmp_path / "trigger.yaml"
    trigger.write_text(
        "deployments:\n  - name: a\n    entrypoint: flows/screen.py:screen\n"
        "    triggers: [{type: event, posture: Sideways}]\n"
    )
    with pytest.raises(ConfigError, match="bad trigger"):
        runner_deployments(trigger)
