"""The accuracy-evaluation flow against the simulator at known per-model sensitivity and
specificity: recovery within the CIs, agreement with scikit-learn, the consensus gain, the
reliability weights fed back into screening, and the regression alert (event + failed run)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydicom.uid import generate_uid
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from flows.evaluate import evaluate_accuracy
from simulator.process import running_simulator
from simulator.samples import synthetic_ct
from tasks.consensus.reliability import load_reliability, log_odds_weight, model_weights
from tasks.consensus.vote import build_consensus
from tasks.core.config import ReviewConfig, Settings
from tasks.core.errors import ConfigError, LabelError
from tasks.core.schema import Report
from tasks.evaluation.metrics import find_regressions, parse_labels
from tasks.evaluation.outputs import REGRESSION_EVENT
from tests.helpers import KEY_ENV, TEST_KEY, reading, run_radflow, sim_config

N_STUDIES = 60
N_REGRESSION = 20  # the forced-regression run reads the first 20 again
# name → (sensitivity, specificity) the simulator answers with; errors independent per model
PROFILES = {"m1": (0.9, 0.7), "m2": (0.7, 0.9), "m3": (0.8, 0.8)}


def _config(sim, path: Path, **extra) -> Path:
    config = {
        "language": "en",
        "models": [
            {
                "name": name,
                "provider": "anthropic" if name == "m2" else "openai",
                "model": name,
                "base_url": sim.url if name == "m2" else sim.openai_base_url,
                "api_key_env": KEY_ENV,
            }
            for name in PROFILES
        ],
        "evaluation": {"bootstrap_resamples": 300, "seed": 7},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _profile_args(profiles: dict[str, tuple[float, float]]) -> list[str]:
    return [a for m, (se, sp) in profiles.items() for a in ("--profile", f"{m}={se},{sp}")]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    """60 small synthetic CT studies, half with a lesion, and their labels CSV; the first 20
    again as a smaller labelled set (subset/, labels-20.csv) for the regression run."""
    root = tmp_path_factory.mktemp("labelled")
    rows = ["study_instance_uid,abnormal,patient_id,findings"]
    for i in range(N_STUDIES):
        lesion = i % 2 == 0
        uid = generate_uid(entropy_srcs=["radflow-eval-test", str(i)])
        path = synthetic_ct(
            root / "images" / f"s{i:03d}.dcm", lesion=lesion, seed=5000 + i, size=128, study_uid=uid
        )
        if i < N_REGRESSION:
            (root / "subset").mkdir(exist_ok=True)
            shutil.copyfile(path, root / "subset" / path.name)
        rows.append(f"{uid},{int(lesion)},P{i:03d},{'lesion' if lesion else ''}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "labels-20.csv").write_text("\n".join(rows[: N_REGRESSION + 1]) + "\n")
    return root / "images", root / "labels.csv"


@pytest.fixture(scope="module")
def sim():
    with running_simulator("--seed", "11", *_profile_args(PROFILES)) as s:
        yield s


@pytest.fixture(scope="module")
def evaluated(prefect_harness, sim, labelled, tmp_path_factory) -> tuple[Path, dict]:
    images, labels = labelled
    root = tmp_path_factory.mktemp("evaluated")
    dest = root / "dest"
    config = _config(sim, root / "radflow.yaml")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the autouse key fixture
        mp.setenv(KEY_ENV, TEST_KEY)
        metrics = asyncio.run(evaluate_accuracy(str(labels), str(images), str(dest), str(config)))
    return dest, metrics


@pytest.mark.e2e
def test_recovers_known_sensitivity_and_specificity_within_cis(evaluated):
    dest, metrics = evaluated
    on_disk = json.loads((dest / "metrics.json").read_text())
    assert on_disk["consensus"] == metrics["consensus"]
    assert len(metrics["cases"]) == N_STUDIES and metrics["missing"] == []
    for name, (sens, spec) in PROFILES.items():
        m = metrics["models"][name]
        assert m["n"] == N_STUDIES
        lo, hi = m["ci95"]["sensitivity"]
        assert lo <= sens <= hi, (name, "sensitivity", m["sensitivity"], lo, hi)
        lo, hi = m["ci95"]["specificity"]
        assert lo <= spec <= hi, (name, "specificity", m["specificity"], lo, hi)
        for metric in ("sensitivity", "specificity", "accuracy", "auroc"):
            lo, hi = m["ci95"][metric]
            assert lo <= m[metric] <= hi and hi - lo < 0.4
    reliability = json.loads((dest / "reliability.json").read_text())["models"]
    for name, (sens, spec) in PROFILES.items():
        assert abs(reliability[name]["sensitivity"] - sens) < 0.15
        assert abs(reliability[name]["specificity"] - spec) < 0.15
        assert reliability[name]["weight"] == log_odds_weight(
            reliability[name]["sensitivity"], reliability[name]["specificity"]
        )


@pytest.mark.e2e
def test_reported_numbers_equal_scikit_learn_on_the_case_table(evaluated):
    _, metrics = evaluated
    cases = metrics["cases"]
    y = np.array([c["truth"] for c in cases])
    subjects = {"consensus": [c["consensus"]["predicted"] for c in cases]}
    subjects |= {m: [c["models"][m]["predicted"] for c in cases] for m in PROFILES}
    for name, pred in subjects.items():
        p = np.array(pred)
        got = metrics["consensus"] if name == "consensus" else metrics["models"][name]
        score = np.array([c["consensus"]["score"] for c in cases]) if name == "consensus" else p
        expected = {
            "accuracy": accuracy_score(y, p),
            "sensitivity": recall_score(y, p),
            "specificity": recall_score(y, p, pos_label=0),
            "ppv": precision_score(y, p),
            "npv": precision_score(y, p, pos_label=0),
            "f1": f1_score(y, p),
            "auroc": roc_auc_score(y, score),
            "cohen_kappa": cohen_kappa_score(y, p),
        }
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value, abs=1e-6), (name, metric)
        cm = got["confusion"]
        assert cm["tp"] + cm["fn"] == int(y.sum()) and sum(cm.values()) == len(y)
    # the labelled finding is scored too: the simulator says "focal bright lesion"
    lesion = metrics["findings"]["lesion"]
    said = np.array([any("lesion" in f.lower() for f in c["consensus"]["findings"]) for c in cases])
    assert lesion["positives"] == N_STUDIES // 2 == int(y.sum())
    assert lesion["sensitivity"] == pytest.approx(recall_score(y, said), abs=1e-6)
    assert lesion["specificity"] == pytest.approx(recall_score(y, said, pos_label=0), abs=1e-6)


@pytest.mark.e2e
def test_consensus_beats_the_best_single_model_with_independent_errors(evaluated):
    _, metrics = evaluated
    best = max(m["accuracy"] for m in metrics["models"].values())
    assert metrics["consensus"]["accuracy"] > best
    assert metrics["consensus"]["cohen_kappa"] > max(
        m["cohen_kappa"] for m in metrics["models"].values()
    )
    # majority of three independent readers at these rates: ≈ 0.90 expected, each alone 0.80
    assert metrics["consensus"]["accuracy"] >= 0.85


@pytest.mark.e2e
def test_plots_summary_and_artifacts(evaluated, prefect_harness):
    dest, metrics = evaluated
    for name in ("roc.png", "calibration.png"):
        with Image.open(io.BytesIO((dest / name).read_bytes())) as img:
            assert img.format == "PNG" and img.width > 200
    summary = (dest / "summary.md").read_text()
    cm = metrics["consensus"]["confusion"]
    assert f"| called abnormal | {cm['tp']} (TP) | {cm['fp']} (FP) |" in summary
    assert "No previous evaluation" in summary
    assert len(list(dest.glob("evaluations/*/metrics.json"))) == 1

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table", "image"]))
            )

    found = asyncio.run(artifacts())
    tables = [a for a in found if a.type == "table" and a.key and a.key.endswith("-metrics")]
    rows = tables[-1].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {"consensus", *PROFILES} == {r["subject"] for r in rows}
    assert any(a.type == "image" and str(a.data).startswith("data:image/png") for a in found)


def _read_events(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    async def read():
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=[REGRESSION_EVENT]),
                    related=EventRelatedFilter(
                        resources_in_roles=[(f"prefect.flow-run.{flow_run_id}", "flow-run")]
                    ),
                ),
                limit=50,
            )
            return page.events

    return asyncio.run(read())


@pytest.mark.e2e
def test_forced_regression_emits_event_fails_run_and_uses_measured_weights(
    evaluated, labelled, prefect_harness, tmp_path
):
    root = labelled[1].parent
    images, labels = root / "subset", root / "labels-20.csv"
    dest = tmp_path / "dest"
    shutil.copytree(evaluated[0], dest)  # the previous evaluation at this destination
    reliability = dest / "reliability.json"
    measured = load_reliability(str(reliability))
    worse = {m: (0.3, 0.3) for m in PROFILES}  # worse than chance
    with running_simulator("--seed", "11", *_profile_args(worse)) as bad:
        config = _config(bad, tmp_path / "radflow.yaml", reliability=str(reliability))
        state = asyncio.run(
            evaluate_accuracy(str(labels), str(images), str(dest), str(config), return_state=True)
        )
    assert state.is_failed()
    assert "regressed" in state.message and "consensus sensitivity" in state.message
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["regressions"] and metrics["change_since_previous"]["consensus"]["accuracy"] < 0
    assert "⚠ Regression" in (dest / "summary.md").read_text()
    # the screening consensus voted with the weights measured by the first evaluation
    assert len(metrics["cases"]) == N_REGRESSION
    for case in metrics["cases"]:
        uid = case["study_instance_uid"]
        report = Report.model_validate_json((dest / "studies" / uid / "report.json").read_text())
        assert report.consensus.weights == measured
        assert report.consensus.weights_source == str(reliability)

    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 30
    events = _read_events(flow_run_id)
    while not events and time.monotonic() < deadline:  # the server persists events in batches
        time.sleep(0.5)
        events = _read_events(flow_run_id)
    assert len(events) == 1
    payload = events[0].payload
    assert {r["subject"] for r in payload["regressions"]} >= {"consensus"}
    assert all(r["before"] - r["after"] > payload["margin"] for r in payload["regressions"])


def test_labels_are_validated_with_one_clear_error():
    with pytest.raises(LabelError, match=r'"x.csv" lack the column\(s\) abnormal'):
        parse_labels("study_instance_uid\n1.2.3\n", "x.csv")
    with pytest.raises(LabelError, match=r'"x.csv" line 3: abnormal must be 0 or 1, not "maybe"'):
        parse_labels("study_instance_uid,abnormal\n1.2,1\n1.3,maybe\n", "x.csv")
    with pytest.raises(LabelError, match="line 3: study 1.2 is labelled twice"):
        parse_labels("study_instance_uid,abnormal\n1.2,1\n1.2,0\n", "x.csv")
    labels = parse_labels(
        "\ufeffstudy_instance_uid,abnormal,findings\n1.2,1,Nodule; effusion|nodule\n1.3,0,\n", "x"
    )
    assert labels[0].findings == ("effusion", "nodule") and labels[1].abnormal == 0


@pytest.mark.e2e
def test_cli_rejects_bad_labels_before_any_run(tmp_path, prefect_harness):
    bad = tmp_path / "labels.csv"
    bad.write_text("uid,abnormal\n1.2,1\n")
    proc = run_radflow("evaluate", str(bad), "--images", str(tmp_path), "--out",
                       str(tmp_path / "out"), api_url=prefect_harness, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "lack the column(s) study_instance_uid" in proc.stderr and str(bad) in proc.stderr


def test_measured_weights_change_the_vote(tmp_path):
    strong, weak = log_odds_weight(0.95, 0.95), log_odds_weight(0.65, 0.65)
    assert strong == pytest.approx(np.log(0.95**2 / 0.05**2), abs=1e-4)
    assert log_odds_weight(0.5, 0.5) == 0 and log_odds_weight(0.3, 0.4) == 0
    readings = [reading("a", True), reading("b", False), reading("c", False)]
    review = ReviewConfig()
    assert build_consensus(readings, {}, review).abnormal is False  # one vote each: 1 vs 2
    weighted = build_consensus(readings, {"a": strong, "b": weak, "c": weak}, review)
    assert weighted.abnormal is True and weighted.score > 0.5  # the reliable model decides

    path = tmp_path / "reliability.json"
    path.write_text(json.dumps({"models": {"a": {"weight": strong}, "z": {"weight": 2.0}}}))
    settings = Settings.model_validate(
        {
            "models": [
                {"name": "a", "provider": "openai", "model": "a", "weight": 1.0},
                {"name": "b", "provider": "openai", "model": "b", "weight": 0.5},
            ],
            "reliability": str(path),
        }
    )
    assert model_weights(settings) == ({"a": strong, "b": 0.5}, str(path))
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a radflow reliability.json"):
        model_weights(settings)
    with pytest.raises(ConfigError, match="does not exist"):
        load_reliability(str(tmp_path / "missing.json"))


def test_regressions_only_beyond_the_margin():
    before = {"consensus": {"sensitivity": 0.9, "specificity": 0.8}, "models": {}}
    after = {"consensus": {"sensitivity": 0.86, "specificity": 0.7}, "models": {}}
    found = find_regressions(before, after, 0.05)
    assert [(r.subject, r.metric) for r in found] == [("consensus", "specificity")]
    assert find_regressions(None, after, 0.0) == []


@pytest.mark.e2e
def test_cli_evaluates_on_s3_with_the_storage_settings(
    prefect_harness, moto_server, simulator, tmp_path
):
    """LABELS, images and DEST on S3 (moto_server): every object the evaluation writes,
    metrics.json and reliability.json included, carries the configured aws:kms key."""
    import boto3

    s3 = boto3.client("s3")
    for bucket in ("eval-labels", "eval-images", "eval-out"):
        s3.create_bucket(Bucket=bucket)
    rows = ["study_instance_uid,abnormal"]
    for i in range(4):
        uid = generate_uid(entropy_srcs=["radflow-eval-s3", str(i)])
        path = synthetic_ct(
            tmp_path / f"s{i}.dcm", lesion=i % 2 == 0, seed=8100 + i, size=64, study_uid=uid
        )
        s3.upload_file(str(path), "eval-images", f"in/s{i}.dcm")
        rows.append(f"{uid},{int(i % 2 == 0)}")
    s3.put_object(Bucket="eval-labels", Key="sets/labels.csv", Body="\n".join(rows).encode())
    key_id = "alias/radflow-eval"
    config = sim_config(
        simulator,
        tmp_path,
        storage={"sse": "aws:kms", "kms_key_id": key_id},
        evaluation={"bootstrap_resamples": 100, "seed": 3},
        preprocess={"max_edge": 64},
    )
    proc = run_radflow(
        "evaluate", "s3://eval-labels/sets/labels.csv", "--images", "s3://eval-images/in",
        "--out", "s3://eval-out/ev", "--config", str(config), api_url=prefect_harness,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "metrics, reliability, plots → s3://eval-out/ev" in proc.stdout

    metrics = json.loads(s3.get_object(Bucket="eval-out", Key="ev/metrics.json")["Body"].read())
    assert metrics["consensus"]["n"] == 4 and metrics["missing"] == []
    reliability = s3.get_object(Bucket="eval-out", Key="ev/reliability.json")["Body"].read()
    assert set(json.loads(reliability)["models"]) == {"gpt-4o", "claude"}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="eval-out", Prefix="ev/")
    written = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert {"ev/metrics.json", "ev/reliability.json", "ev/summary.md", "ev/roc.png"} <= set(written)
    assert len([k for k in written if k.endswith("/report.json")]) == 4
    for key in written:  # the evaluation's files and the screening's alike
        head = s3.head_object(Bucket="eval-out", Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"].endswith(key_id), key
