"""S3 in and out against a real S3 wire protocol (moto_server on loopback, boto3 pointed at it):
pagination, odd keys, ranged header reads, downloads to temp files, multipart, SSE, reruns, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pydicom
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from prefect.states import Completed, Failed

from flows.screen import screen
from simulator.samples import synthetic_ct
from tasks.core.config import StorageConfig
from tasks.core.errors import ObjectMissing, StorageError, StorageUnavailable, retry_if_transient
from tasks.core.schema import Report, RunSummary
from tasks.ingest.discover import read_header
from tasks.storage import open_store
from tasks.storage.s3 import S3Store, parse_s3_uri, storage_error
from tests.helpers import run_screen, sim_calls, sim_config

JUNK = 1050  # tiny non-DICOM objects: more than one list_objects_v2 page (1,000 keys)
ODD_KEY = "synthetic/환자 00/lesion slice 100% (a+b) #1.dcm"
MIB = 2**20


def _s3():
    return boto3.client("s3")


def _big_dicom(path: Path) -> Path:
    """An 8 MiB CT slice (2048², uint16) whose header holds a 150 KB private element, so
    the header read must grow past the first 64 KiB range."""
    synthetic_ct(path, lesion=True, seed=99, size=2048)
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0009, "RADFLOW TEST", create=True)
    block.add_new(0x10, "OB", bytes(150_000))
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def scans(moto_server, samples, tmp_path_factory) -> dict[str, int]:
    """Bucket "scans", prefix "in/": the sample studies (one under an odd key), an 8 MiB
    multipart-uploaded study and 1,050 junk objects. Returns {key under the prefix: size}."""
    s3 = _s3()
    s3.create_bucket(Bucket="scans")
    s3.put_object(Bucket="scans", Key="other/not-under-prefix.dcm", Body=b"x")
    s3.put_object(Bucket="scans", Key="in/empty-folder/", Body=b"")  # a folder marker: no data
    keys: dict[str, int] = {}
    for path in sorted(p for p in samples.rglob("*") if p.is_file()):
        key = path.relative_to(samples).as_posix()
        key = ODD_KEY if key == "synthetic/환자 00/lesion slice.dcm" else key
        s3.upload_file(str(path), "scans", "in/" + key)
        keys[key] = path.stat().st_size
    big = _big_dicom(tmp_path_factory.mktemp("big") / "big.dcm")
    small_parts = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    s3.upload_file(str(big), "scans", "in/big/ct 2048.dcm", Config=small_parts)
    keys["big/ct 2048.dcm"] = big.stat().st_size
    junk = {f"junk/{i:04d} note ü%.txt": f"not a dicom {i}".encode() for i in range(JUNK)}
    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe
        list(
            pool.map(
                lambda kv: s3.put_object(Bucket="scans", Key="in/" + kv[0], Body=kv[1]),
                junk.items(),
            )
        )
    keys.update({k: len(v) for k, v in junk.items()})
    return keys


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b") == ("b", "")
    assert parse_s3_uri("s3://b/") == ("b", "")
    assert parse_s3_uri("s3://b/in") == ("b", "in/")
    assert parse_s3_uri("s3://b/in/x/") == ("b", "in/x/")
    with pytest.raises(StorageError, match="not an S3 URI"):
        parse_s3_uri("s3:///nobucket")


def test_storage_config_rejects_a_kms_key_without_kms():
    with pytest.raises(ValueError, match="kms_key_id"):
        StorageConfig(kms_key_id="alias/x")
    assert StorageConfig(sse="aws:kms", kms_key_id="alias/x").kms_key_id == "alias/x"


@pytest.mark.e2e
def test_listing_pages_past_1000_keys_with_odd_names(scans):
    store = open_store("s3://scans/in")
    refs = list(store.list())
    assert {r.key: r.size for r in refs} == scans  # no folder marker, nothing outside "in/"
    assert len(refs) == JUNK + 10
    odd = next(r for r in refs if r.key == ODD_KEY)
    assert odd.uri == f"s3://scans/in/{ODD_KEY}"
    head = _s3().head_object(Bucket="scans", Key="in/" + ODD_KEY)
    assert odd.version == head["ETag"].strip('"')
    big = next(r for r in refs if r.key == "big/ct 2048.dcm")
    assert big.version.endswith("-2")  # a multipart ETag: two parts


@pytest.mark.e2e
def test_header_read_fetches_only_the_header_and_grows_the_range(scans):
    store = open_store("s3://scans/in")
    ref = next(r for r in store.list() if r.key == "big/ct 2048.dcm")
    with store.open_header(ref.key) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        raw = fh.raw
    assert ds.Rows == 2048 and "PixelData" not in ds
    assert 150_000 < raw.loaded < 1 * MIB < ref.size  # the header, not the 8 MiB of pixels
    assert raw.requests >= 2  # 64 KiB was not enough: the range grew
    inst = read_header(store, ref)
    assert inst.study_instance_uid == ds.StudyInstanceUID and inst.ref.uri.endswith("2048.dcm")


@pytest.mark.e2e
def test_full_read_streams_to_a_temp_file_and_matches(scans, samples):
    store = S3Store("s3://scans/in", StorageConfig(multipart_threshold_mib=5))
    with store.open_read("big/ct 2048.dcm") as fh:
        assert isinstance(fh.fileno(), int)  # a file on disk, not bytes in RAM
        data = fh.read()
    assert len(data) == scans["big/ct 2048.dcm"]
    with store.open_read(ODD_KEY) as fh:
        original = (samples / "synthetic/환자 00/lesion slice.dcm").read_bytes()
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(original).digest()
    with pytest.raises(ObjectMissing, match="NoSuchKey|404"):
        store.read_bytes("no such key.json")
    assert not store.exists("no such key.json")


@pytest.mark.e2e
def test_writes_are_encrypted_single_and_multipart(moto_server):
    s3 = _s3()
    s3.create_bucket(Bucket="enc")
    aes = open_store("s3://enc/a", StorageConfig(multipart_threshold_mib=5))
    aes.write_bytes("small.json", b"{}", "application/json")
    aes.write_bytes("big.bin", bytes(6 * MIB))
    kms = S3Store("s3://enc/k", StorageConfig(sse="aws:kms", kms_key_id="alias/radflow"))
    kms.write_bytes("x.json", b"{}")
    small = s3.head_object(Bucket="enc", Key="a/small.json")
    assert small["ServerSideEncryption"] == "AES256"
    assert small["ContentType"] == "application/json"
    big = s3.head_object(Bucket="enc", Key="a/big.bin")
    assert big["ServerSideEncryption"] == "AES256" and big["ETag"].strip('"').endswith("-2")
    assert big["ContentLength"] == 6 * MIB
    k = s3.head_object(Bucket="enc", Key="k/x.json")
    assert k["ServerSideEncryption"] == "aws:kms" and k["SSEKMSKeyId"].endswith("alias/radflow")
    assert aes.exists("small.json") and aes.read_bytes("small.json") == b"{}"


@pytest.mark.e2e
def test_a_missing_bucket_is_one_clear_error(moto_server):
    with pytest.raises(StorageError) as info:
        open_store("s3://no-such-bucket/in")
    text = str(info.value)
    assert "no-such-bucket" in text and "NoSuchBucket" in text and "\n" not in text
    assert not isinstance(info.value, StorageUnavailable)


def test_boto_errors_map_to_permanent_transient_and_missing():
    def client_error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {}}
        body["ResponseMetadata"]["HTTPStatusCode"] = status
        return ClientError(body, "GetObject")

    denied = storage_error(client_error("AccessDenied", 403), "read", "b", "k/x.dcm")
    assert type(denied) is StorageError and '"s3://b/k/x.dcm"' in str(denied)
    slow = storage_error(client_error("SlowDown", 503), "read", "b", "k")
    assert isinstance(slow, StorageUnavailable)
    assert isinstance(
        storage_error(client_error("NoSuchKey", 404), "read", "b", "k"), ObjectMissing
    )
    # the discovery and screen-studies tasks retry transient failures only
    assert retry_if_transient(None, None, Failed(data=slow))
    assert not retry_if_transient(None, None, Failed(data=denied))
    assert retry_if_transient(None, None, Failed(data=OSError("disk")))
    assert retry_if_transient(None, None, Completed(data=1))


def _all_keys(bucket: str, prefix: str) -> list[str]:
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.e2e
def test_screen_s3_to_s3_reports_every_object_once_encrypted_and_reruns_free(
    prefect_harness, simulator, scans, tmp_path
):
    s3 = _s3()
    s3.create_bucket(Bucket="reports")
    config = sim_config(
        simulator, tmp_path, storage={"multipart_threshold_mib": 5, "max_concurrency": 8}
    )
    before = sim_calls(simulator)

    summary = asyncio.run(screen("s3://scans/in", "s3://reports/out/", str(config)))

    # 4 real + 4 synthetic studies + the 8 MiB multipart one
    assert summary.studies == summary.reported == 9 and summary.degraded == 0
    assert sim_calls(simulator) - before == 18 == summary.model_calls
    written = _all_keys("reports", "out/")
    report_keys = [k for k in written if k.endswith("/report.json")]
    reports = [
        Report.model_validate_json(s3.get_object(Bucket="reports", Key=k)["Body"].read())
        for k in report_keys
    ]
    errors = [
        json.loads(s3.get_object(Bucket="reports", Key=k)["Body"].read())
        for k in written
        if k.startswith("out/errors/")
    ]
    assert len(errors) == JUNK + 1 == summary.errors  # the junk and notes.txt
    assert all("not a DICOM file" in e["reason"] for e in errors)
    # every input object ends in exactly one report or error record, named by its URI
    outcomes = [s for r in reports for s in r.sources] + [e["source"] for e in errors]
    assert sorted(outcomes) == sorted(f"s3://scans/in/{k}" for k in scans)
    odd = next(r for r in reports if f"s3://scans/in/{ODD_KEY}" in r.sources)
    assert odd.consensus.abnormal is not None
    big = next(r for r in reports if "s3://scans/in/big/ct 2048.dcm" in r.sources)
    assert big.images[0].width == 1024  # decoded from the temp-file download, resized

    # every object written is encrypted at rest
    for key in written:
        assert s3.head_object(Bucket="reports", Key=key)["ServerSideEncryption"] == "AES256"
    assert len([k for k in written if k.startswith("out/runs/") and k.endswith(".json")]) == 1

    # an immediate rerun makes no model call and rewrites no report
    stamps = {k: s3.head_object(Bucket="reports", Key=k)["LastModified"] for k in report_keys}
    again = asyncio.run(screen("s3://scans/in", "s3://reports/out/", str(config)))
    assert again.skipped == 9 and again.reported == 0 and again.model_calls == 0
    assert sim_calls(simulator) - before == 18
    assert stamps == {
        k: s3.head_object(Bucket="reports", Key=k)["LastModified"] for k in report_keys
    }
    runs = [
        RunSummary.model_validate_json(s3.get_object(Bucket="reports", Key=k)["Body"].read())
        for k in _all_keys("reports", "out/runs/")
        if k.endswith(".json")
    ]
    assert sorted((r.model_calls, r.skipped) for r in runs) == [(0, 9), (18, 0)]


@pytest.mark.e2e
def test_cli_missing_bucket_stops_with_one_line(prefect_harness, moto_server, tmp_path):
    proc = run_screen(
        "s3://no-such-bucket/incoming", tmp_path / "out", api_url=prefect_harness, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "s3://no-such-bucket/" in lines[0] and "NoSuchBucket" in lines[0]
    assert "Traceback" not in proc.stderr


class _FlakyProxy:
    """An HTTP proxy on loopback in front of moto_server that answers the first ``faults``
    requests with 503 SlowDown (S3's throttling reply) or drops the connection (a reset)."""

    def __init__(self, upstream: str, faults: int, mode: str = "503") -> None:
        import http.server
        import threading

        import httpx

        proxy = self
        self.faults, self.seen = faults, 0
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.seen += 1
                    fail = proxy.faults > 0
                    proxy.faults -= fail
                if fail and mode == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail:
                    xml = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                resp = httpx.request(
                    self.command,
                    upstream + self.path,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                    content=body,
                )
                self.send_response(resp.status_code)
                hop = {"transfer-encoding", "connection", "content-encoding", "content-length"}
                for k, v in resp.headers.items():
                    if k.lower() not in hop:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_errors_are_retried_then_reported(moto_server, monkeypatch, mode):
    s3 = _s3()
    s3.create_bucket(Bucket=f"flaky-{mode}")
    s3.put_object(Bucket=f"flaky-{mode}", Key="in/a b.txt", Body=b"hello")
    retrying = StorageConfig(retry_mode="standard", max_attempts=4)
    with _FlakyProxy(moto_server, faults=2, mode=mode) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = S3Store(f"s3://flaky-{mode}/in", retrying)
        assert [r.key for r in store.list()] == ["a b.txt"]  # 2 failures, then the answer
        assert proxy.seen == 3
        proxy.faults = 1
        assert store.read_bytes("a b.txt") == b"hello"
        assert proxy.seen == 5
    with _FlakyProxy(moto_server, faults=5, mode=mode) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        once = S3Store(f"s3://flaky-{mode}/in", StorageConfig(max_attempts=2))
        with pytest.raises(StorageUnavailable, match=f"flaky-{mode}/in/a b.txt"):
            once.read_bytes("a b.txt")
        assert proxy.seen == 2  # the configured attempts, no more
    print(
        f"\nRELIABILITY storage faults ({mode}): 3 injected into a listing and a read "
        f"→ retried, both answered intact; 5 in a row with max_attempts=2 → "
        f"StorageUnavailable after 2 attempts, nothing read half"
    )


def test_stores_with_the_same_settings_share_one_client(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    a, b = S3Store("s3://in/x/", StorageConfig()), S3Store("s3://out/", StorageConfig())
    assert a.client is b.client  # one botocore session per process, not one per store
    assert S3Store("s3://in/", StorageConfig(max_concurrency=3)).client is not a.client
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")  # a new endpoint, a new client
    moved = S3Store("s3://in/x/", StorageConfig()).client
    assert moved is not a.client and moved.meta.endpoint_url == "http://127.0.0.1:2"
