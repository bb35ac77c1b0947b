"""Fine-tune dataset flow: annotation parsing, patient split, cookbook checks extended to images,
the flow on a real Prefect API, and the upload to the simulator's /v1/files and
/v1/fine_tuning/jobs with the official SDK."""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import io
import json
from pathlib import Path

import openai
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.dataset import build_finetune_dataset
from simulator.samples import synthetic_ct
from tasks.core.config import Language, Settings
from tasks.core.errors import AnnotationError, DatasetError
from tasks.core.schema import Reading
from tasks.finetune.checks import check_example, check_examples, estimate_cost
from tasks.finetune.examples import (
    build_example,
    parse_annotation,
    parse_annotations,
    split_by_patient,
)
from tasks.models.panel import load_prompt
from tasks.storage import LocalStore
from tests.helpers import TEST_KEY, run_radflow, sim_config

PATIENTS = 14
PHI_VALUES = ("SYNTHETIC^PATIENT", "SYN-00", "19700101", "ACC00", "Synthetic General Hospital")
FIELDS = ["image", "patient_id", "abnormal", "urgency", "diagnosis", "image_description"]
FIELDS += ["findings", "recommendation", "confidence"]


def _row(key: str, patient: str, lesion: bool) -> dict[str, str]:
    return {
        "image": key,
        "patient_id": patient,
        "abnormal": "1" if lesion else "0",
        "urgency": "follow_up" if lesion else "normal",
        "diagnosis": "pulmonary nodule" if lesion else "normal",
        "image_description": "Round bright lesion in the right lung."
        if lesion
        else "Clear lungs, no focal lesion.",
        "findings": "solid nodule; no effusion" if lesion else "",
        "recommendation": "contrast CT in 3 months" if lesion else "",
        "confidence": "0.9",
    }


@pytest.fixture(scope="module")
def annotated(tmp_path_factory) -> tuple[Path, Path]:
    """14 synthetic patients × 2 CT studies, annotated in a CSV whose last three lines are bad
    (a missing image, an unreadable DICOM, an unknown label)."""
    root = tmp_path_factory.mktemp("annotated")
    images = root / "images"
    rows = []
    for p in range(PATIENTS):
        for s in range(2):
            lesion = (p + s) % 2 == 0 or p % 5 == 0
            key = f"patient-{p:02d}/study {s}.dcm"
            synthetic_ct(images / key, lesion=lesion, seed=500 + 2 * p + s, size=128)
            rows.append(_row(key, f"patient-{p:02d}", lesion))
    (images / "broken.dcm").write_bytes(b"DICM but not really" * 10)
    rows.append(_row("patient-99/missing.dcm", "patient-99", True))
    rows.append(_row("broken.dcm", "patient-98", True))
    rows.append({**_row("patient-00/study 0.dcm", "patient-00", True), "abnormal": "maybe"})
    annotations = root / "annotations.csv"
    with annotations.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return annotations, images


# --- annotations -------------------------------------------------------------------------


def test_seed_keys_become_a_reading():
    a = parse_annotation(
        {
            "image": "a.dcm; b.dcm",
            "patient_id": 7,
            "diagnosis": "pneumonia",
            "image_description": "Consolidation in the left lower lobe.",
            "findings": "consolidation\nair bronchogram",
            "recommendation": "follow-up chest X-ray",
            "confidence": 0.8,
        },
        line=3,
    )
    assert a.images == ("a.dcm", "b.dcm") and a.patient_id == "7" and a.line == 3
    assert a.reading == Reading(
        abnormal=True,
        findings=["consolidation", "air bronchogram"],
        differentials=["pneumonia"],
        urgency="follow_up",
        recommended_exams=["follow-up chest X-ray"],
        rationale="Consolidation in the left lower lobe.",
    )
    normal = parse_annotation({"image": "c.dcm", "patient_id": "x", "diagnosis": "정상"}, 4)
    assert normal.reading.abnormal is False and normal.reading.urgency == "normal"
    assert normal.reading.differentials == []


def test_bad_annotation_lines_are_reported_with_their_numbers():
    lines = [
        {"image": "a.dcm", "patient_id": "p1", "abnormal": 1},
        {"image": "b.dcm", "patient_id": "p1", "abnormal": "maybe"},
        "{not json",
        {"patient_id": "p2", "abnormal": 0},
        {"image": "c.dcm", "abnormal": 0},
        {"image": "d.dcm", "patient_id": "p3", "urgency": "soon"},
        {"image": "e.dcm", "patient_id": "p3", "abnormal": 0, "urgency": "immediate"},
        {"image": "f.dcm", "patient_id": "p3", "abnormal": 1, "mrn": "123"},
        {"image": "g.dcm", "patient_id": "p3"},
        {"image": [f"{i}.dcm" for i in range(11)], "patient_id": "p3", "abnormal": 1},
        {"image": "h.dcm", "patient_id": "p4", "abnormal": 1, "confidence": "high"},
    ]
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
    good, bad = parse_annotations(data, "labels.jsonl")
    assert [a.line for a in good] == [1]
    reasons = {r.line: r.reason for r in bad}
    assert sorted(reasons) == list(range(2, 12))
    assert 'abnormal="maybe"' in reasons[2]
    assert "invalid JSON" in reasons[3]
    assert 'no "image"' in reasons[4]
    assert 'no "patient_id"' in reasons[5]
    assert 'urgency="soon"' in reasons[6]
    assert "contradictory" in reasons[7]
    assert "'mrn'" in reasons[8]
    assert "no label" in reasons[9]
    assert "11 images" in reasons[10]
    assert 'confidence="high"' in reasons[11]


def test_blank_csv_cells_are_not_given_and_the_first_bad_field_is_the_reason():
    text = (
        "image,patient_id,abnormal,urgency,diagnosis,confidence,findings\n"
        "a.dcm,p1,,,nodule,,\n"  # blank label, urgency, confidence: the diagnosis decides
        "b.dcm,p2,maybe,soon,,,\n"  # two bad fields: the first one (urgency) is named
        "c.dcm,p3,on,,,0.25,x; y\n"
    )
    good, bad = parse_annotations(text.encode(), "a.csv")
    assert [(a.line, a.reading.abnormal, a.reading.findings) for a in good] == [
        (2, True, []),
        (4, True, ["x", "y"]),
    ]
    assert [(r.line, r.reason.split(" (")[0]) for r in bad] == [(3, 'unknown label urgency="soon"')]


def test_csv_line_numbers_count_the_header_and_multiline_fields():
    text = (
        'image,patient_id,abnormal,image_description\na.dcm,p1,1,"two\nlines"\nb.dcm,p2,perhaps,x\n'
    )
    good, bad = parse_annotations(text.encode(), "a.csv")
    assert [a.line for a in good] == [2]
    assert [(r.line, r.image) for r in bad] == [(4, "b.dcm")]
    with pytest.raises(AnnotationError, match=r"\.csv or \.jsonl"):
        parse_annotations(b"x", "labels.txt")


# --- split -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_keeps_patients_apart_and_stratifies(seed):
    # 20 patients with 3 studies each, interleaved; a third of the patients abnormal
    groups = [f"p{(i * 7) % 20}" for i in range(60)]
    labels = [int(g[1:]) % 3 == 0 or i % 11 == 0 for i, g in enumerate(groups)]
    train, val = split_by_patient(labels, groups, 0.2, seed)
    assert sorted(train + val) == list(range(60))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert 9 <= len(val) <= 15
    share = sum(labels) / len(labels)
    assert abs(sum(labels[i] for i in val) / len(val) - share) < 0.2
    assert (train, val) == split_by_patient(labels, groups, 0.2, seed)  # seeded
    assert val != split_by_patient(labels, groups, 0.2, seed + 10)[1]  # shuffled


def test_split_names_impossible_fractions():
    with pytest.raises(DatasetError, match="need at least 5"):
        split_by_patient([True, False] * 4, ["a", "b", "c", "d"] * 2, 0.2, 0)
    with pytest.raises(DatasetError, match=r"\[0, 0.5\]"):
        split_by_patient([True], ["a"], 0.7, 0)
    assert split_by_patient([True, False], ["a", "b"], 0.0, 0) == ([0, 1], [])


# --- checks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_example(annotated) -> dict:
    _, images = annotated
    settings = Settings(language=Language.EN)
    annotation = parse_annotation(_row("patient-00/study 0.dcm", "patient-00", True), 2)
    example = build_example(annotation, LocalStore(images), settings, load_prompt("en"))
    return example.record


def _grey_png_url() -> str:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_part(example: dict) -> dict:
    return example["messages"][1]["content"][1]


MUTATIONS = {
    "data_type": lambda e: ["not", "a", "dict"],
    "missing_messages_list": lambda e: {"messages": "hello"},
    "message_missing_key": lambda e: e["messages"][0].pop("content") and e,
    "message_unrecognized_key": lambda e: e["messages"][0].update(patient="x") or e,
    "unrecognized_role": lambda e: e["messages"][0].update(role="doctor") or e,
    "missing_content": lambda e: e["messages"][2].update(content="") or e,
    "example_missing_assistant_message": lambda e: e["messages"].pop() and e,
    "image_not_rgb": lambda e: _image_part(e)["image_url"].update(url=_grey_png_url()) or e,
    "image_not_data_url": lambda e: _image_part(e)["image_url"].update(url="https://x/y.png") or e,
    "image_format_mismatch": lambda e: (
        _image_part(e)["image_url"].update(
            url=_image_part(e)["image_url"]["url"].replace("image/png", "image/jpeg")
        )
        or e
    ),
    "image_outside_user_message": lambda e: (
        e["messages"][2].update(content=[{"type": "text", "text": "x"}, _image_part(e)]) or e
    ),
    "too_many_images": lambda e: e["messages"][1]["content"].extend([_image_part(e)] * 10) or e,
}


def test_built_example_passes_every_check(good_example):
    errors, tokens, assistant = check_example(good_example)
    assert errors == []
    # system prompt + user text + one 128² image (85 + 170 × 1 tile) + the reading
    assert tokens > 255 + assistant and assistant > 20


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_checks_catch_each_kind_of_bad_example(good_example, kind):
    bad = MUTATIONS[kind](copy.deepcopy(good_example))
    errors, _, _ = check_example(bad)
    assert kind in errors


def test_token_limit_and_cookbook_cost_estimate(good_example):
    report = check_examples([good_example] * 3, token_limit=100)
    assert report.over_limit == 3 and not report.ok
    estimate = estimate_cost([1000] * 10, token_limit=16_385, price_per_mtok=25.0)
    # cookbook: 10 examples × 3 epochs < 100 → ceil(100 / 10) = 10 epochs
    assert (estimate.epochs, estimate.billing_tokens_per_epoch) == (10, 10_000)
    assert estimate.training_tokens == 100_000 and estimate.cost_usd == 2.5
    assert estimate_cost([20_000] * 40_000, 16_385, 25.0).epochs == 1  # capped per example
    assert estimate_cost([20_000], 16_385, 25.0).billing_tokens_per_epoch == 16_385


# --- the flow ----------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_flow_builds_a_checked_patient_split_dataset(prefect_harness, annotated, tmp_path):
    annotations, images = annotated
    config = tmp_path / "radflow.yaml"
    config.write_text("language: en\npreprocess: {max_edge: 96}\n")
    out = tmp_path / "dataset"

    manifest = build_finetune_dataset(str(annotations), str(images), str(out), config=str(config))

    train, val = _jsonl(out / "train.jsonl"), _jsonl(out / "validation.jsonl")
    assert len(train) + len(val) == 2 * PATIENTS
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["examples"] == len(train) >= 10
    assert manifest["validation"]["examples"] == len(val) > 0
    train_patients, val_patients = manifest["train"]["patients"], manifest["validation"]["patients"]
    assert not set(train_patients) & set(val_patients)
    assert len(train_patients) + len(val_patients) == PATIENTS
    for part in ("train", "validation"):
        data = (out / f"{part}.jsonl").read_bytes()
        assert manifest[part]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest[part]["abnormal"] > 0 and manifest[part]["normal"] > 0
        assert manifest[part]["checks"]["format_errors"] == {}
    assert check_examples(train + val).ok
    assert manifest["estimate"]["training_tokens"] > 0 and manifest["estimate"]["cost_usd"] > 0

    # the three bad lines (after 28 good ones and the header) are reported with their numbers
    rejected = _jsonl(out / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [30, 31, 32]
    assert "not found" in rejected[0]["reason"] and rejected[0]["image"].endswith("missing.dcm")
    assert rejected[1]["kind"] in ("CorruptDicom", "NotDicom")
    assert "broken.dcm" in rejected[1]["reason"]
    assert 'abnormal="maybe"' in rejected[2]["reason"]

    # each example: screening's prompt, de-identified context, an RGB PNG, a Reading answer
    prompt = load_prompt("en")
    for example in train + val:
        system, user, assistant = example["messages"]
        assert system == {"role": "system", "content": prompt.text}
        text, image = user["content"]
        assert text["text"].startswith("Clinical context: ") and "modality=CT" in text["text"]
        png = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (96, 96))
        Reading.model_validate_json(assistant["content"])
    # no identifier from the DICOM tags, nor the annotation's patient ids, reaches the text
    text = (out / "train.jsonl").read_text() + (out / "validation.jsonl").read_text()
    for value in (*PHI_VALUES, "patient-"):
        assert value not in text

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["finetune-dataset"]))
        )
    summary = max(artifacts, key=lambda a: a.created).data
    assert f"| train | {len(train)} | {len(train_patients)} |" in summary
    assert "patient-" not in summary

    again = build_finetune_dataset(
        str(annotations), str(images), str(tmp_path / "again"), config=str(config)
    )
    assert again["train"]["sha256"] == manifest["train"]["sha256"]  # seeded and deterministic


@pytest.mark.e2e
def test_flow_fails_with_fewer_than_ten_training_examples(prefect_harness, annotated, tmp_path):
    annotations, images = annotated
    rows = list(csv.DictReader(annotations.open(newline="")))
    few = tmp_path / "few.csv"
    with few.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows[:9] + rows[-1:])
    with pytest.raises(DatasetError, match="only 9 valid example.*at least 10"):
        build_finetune_dataset(str(few), str(images), str(tmp_path / "out"), val_fraction=0)
    assert [r["line"] for r in _jsonl(tmp_path / "out" / "rejected.jsonl")] == [11]
    assert not (tmp_path / "out" / "train.jsonl").exists()


# --- upload ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_cli_build_and_upload_to_the_simulator(prefect_harness, simulator, annotated, tmp_path):
    annotations, images = annotated
    config = sim_config(simulator, tmp_path, preprocess={"max_edge": 64})
    out = tmp_path / "uploaded"
    proc = run_radflow(
        "build-dataset", str(annotations), "--images", str(images), "--out", str(out),
        "--config", str(config), "--upload", "--epochs", "2", "--suffix", "radflow-test",
        api_url=prefect_harness, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    upload = manifest["upload"]
    assert upload["job_id"].startswith("ftjob-sim-") and upload["job_id"] in proc.stdout
    assert upload["training_file"] in proc.stdout and upload["validation_file"] in proc.stdout
    assert "3 rejected" in proc.stdout
    assert TEST_KEY not in proc.stdout + proc.stderr

    client = openai.OpenAI(api_key=TEST_KEY, base_url=simulator.openai_base_url)
    job = client.fine_tuning.jobs.retrieve(upload["job_id"])
    assert job.training_file == upload["training_file"]
    assert job.validation_file == upload["validation_file"]
    assert job.hyperparameters.n_epochs == 2 and job.model == "gpt-4o-2024-08-06"
    uploaded = client.files.retrieve(upload["training_file"])
    assert uploaded.bytes == manifest["train"]["bytes"] and uploaded.purpose == "fine-tune"


@pytest.mark.e2e
def test_simulator_rejects_a_file_that_is_not_chat_jsonl(simulator):
    client = openai.OpenAI(api_key=TEST_KEY, base_url=simulator.openai_base_url, max_retries=0)
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    with pytest.raises(openai.BadRequestError, match="assistant message"):
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.fine_tuning.jobs.create(model="gpt-4o-2024-08-06", training_file="file-nope")


@pytest.mark.e2e
def test_create_job_without_validation_file_or_suffix(simulator, good_example):
    from tasks.finetune.upload import Hyperparameters, create_job

    client = openai.OpenAI(api_key=TEST_KEY, base_url=simulator.openai_base_url, max_retries=0)
    train = (json.dumps(good_example) + "\n").encode() * 10
    result = create_job(
        client,
        train,
        None,
        base_model="gpt-4o-mini-2024-07-18",
        hyperparameters=Hyperparameters(batch_size=4, learning_rate_multiplier=0.5),
        suffix=None,
        seed=7,
    )
    job = client.fine_tuning.jobs.retrieve(result["job_id"])
    assert result["validation_file"] is None and job.validation_file is None
    assert (job.hyperparameters.batch_size, job.hyperparameters.n_epochs) == (4, "auto")
    assert job.hyperparameters.learning_rate_multiplier == 0.5 and job.seed == 7
    assert client.files.retrieve(job.training_file).bytes == len(train)


@pytest.mark.e2e
def test_flow_reads_and_writes_s3(prefect_harness, moto_server, annotated, tmp_path):
    """Annotations, images and DEST in S3 (moto_server on loopback), same storage layer as
    screening: every output object is written with server-side encryption."""
    import boto3

    annotations, images = annotated
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="ft-data")
    s3.create_bucket(Bucket="ft-out")
    for path in sorted(p for p in images.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "ft-data", "images/" + path.relative_to(images).as_posix())
    s3.upload_file(str(annotations), "ft-data", "labels/annotations.csv")
    config = tmp_path / "radflow.yaml"
    config.write_text("language: ko\npreprocess: {max_edge: 64}\n")

    manifest = build_finetune_dataset(
        "s3://ft-data/labels/annotations.csv",
        "s3://ft-data/images/",
        "s3://ft-out/run1/",
        config=str(config),
        val_fraction=0.25,
    )

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ft-out")["Contents"]}
    names = ("train.jsonl", "validation.jsonl", "rejected.jsonl", "manifest.json")
    assert keys == {f"run1/{n}" for n in names}
    for key in keys:
        assert s3.head_object(Bucket="ft-out", Key=key)["ServerSideEncryption"] == "AES256"
    train = s3.get_object(Bucket="ft-out", Key="run1/train.jsonl")["Body"].read()
    assert hashlib.sha256(train).hexdigest() == manifest["train"]["sha256"]
    assert manifest["train"]["examples"] + manifest["validation"]["examples"] == 2 * PATIENTS
    assert not set(manifest["train"]["patients"]) & set(manifest["validation"]["patients"])
    first = json.loads(train.splitlines()[0])
    assert first["messages"][1]["content"][0]["text"].startswith("임상 정보: ")
    rejected = s3.get_object(Bucket="ft-out", Key="run1/rejected.jsonl")["Body"].read()
    assert [json.loads(r)["line"] for r in rejected.splitlines()] == [30, 31, 32]
