"""S3 (and S3-compatible) storage with boto3: paginated listing, ranged header reads, downloads
to temporary files, encrypted writes, and one clear error line for permanent failures."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.core.errors import ObjectMissing, StorageError, StorageUnavailable
from tasks.storage.base import ObjectRef

if TYPE_CHECKING:
    from tasks.core.config import StorageConfig

__all__ = ["RangedReader", "S3Store", "parse_s3_uri", "s3_client", "storage_error"]

logger = logging.getLogger(__name__)

# Error codes that retrying cannot fix: the run stops with one line naming bucket and key.
_PERMANENT = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidBucketName",
    "AccountProblem",
    "InvalidObjectState",
    "KMS.AccessDeniedException",
    "KMS.NotFoundException",
    "KMS.DisabledException",
    "403",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}
# A conditional write or delete that lost: the object changed (412), a concurrent conditional
# write won (409), or the object is gone (404 with If-Match).
_CONDITION_FAILED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", *_MISSING}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ("bucket", "some/prefix/"); the prefix ends with "/"
    (so "in" never matches "incoming") unless it is empty."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise StorageError(f'"{uri}" is not an S3 URI', hint="write s3://bucket/prefix")
    prefix = uri[len("s3://") + len(parts.netloc) :].lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parts.netloc, prefix


def storage_error(exc: Exception, action: str, bucket: str, key: str = "") -> Exception:
    """Translate a boto error into a radflow error naming the bucket and key."""
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        message = err.get("Message") or exc.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode", ""
        )
        text = f'cannot {action} "{where}": {code} ({message})'
        if code in _MISSING:
            return ObjectMissing(text)
        if code in _PERMANENT or code.startswith("KMS."):
            return StorageError(text)
        return StorageUnavailable(text)
    if isinstance(exc, BotoCoreError):
        return StorageUnavailable(f'cannot {action} "{where}": {exc}')
    return exc


class RangedReader(io.RawIOBase):
    """A read-only, seekable view of the start of an S3 object, fetched with ranged GETs.

    The first GET asks for ``first`` bytes; a read past what is loaded doubles the loaded
    prefix, so a header of n bytes costs about log2(n / first) + 1 requests, and pixel data
    after the header is never downloaded.
    """

    def __init__(self, store: S3Store, key: str, first: int) -> None:
        super().__init__()
        self._store, self._key, self._next = store, key, max(1024, first)
        self._buf = bytearray()
        self._size: int | None = None  # known after the first GET
        self._pos = 0
        self.requests = 0
        self.name = store.uri_of(key)

    def _load(self, end: int) -> None:
        """Make sure bytes [0, end) are loaded (or the whole object, if shorter)."""
        while len(self._buf) < end and (self._size is None or len(self._buf) < self._size):
            want = max(self._next, end - len(self._buf))
            start = len(self._buf)
            chunk, total = self._store.get_range(self._key, start, start + want - 1)
            self.requests += 1
            self._size = total
            self._buf += chunk
            self._next = want * 2
            if not chunk:
                break

    @property
    def loaded(self) -> int:
        """Bytes fetched so far."""
        return len(self._buf)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            if self._size is None:
                self._load(1)
            pos = (self._size or 0) + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self._load(self._pos + len(view))
        data = self._buf[self._pos : self._pos + len(view)]
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


_clients: dict[tuple[str, ...], Any] = {}
_clients_lock = threading.Lock()
# what boto3 reads from the environment when it makes a client: a changed value, a new client
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def s3_client(config: StorageConfig) -> Any:
    """A boto3 S3 client for ``config``, shared by every store of this process with the same
    settings (clients are thread-safe). Making one costs a new botocore session, ~0.5 s of
    CPU on these machines: per store, that was paid twice per flow run."""
    key = (config.model_dump_json(), *(os.environ.get(name, "") for name in _CLIENT_ENV))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            retries: Any = {
                "mode": config.retry_mode,
                "total_max_attempts": config.max_attempts,  # the first included
            }
            client = _clients[key] = boto3.session.Session().client(
                "s3",
                config=Config(
                    retries=retries,
                    max_pool_connections=2 * config.max_concurrency + 4,  # SOURCE + DEST
                    connect_timeout=config.timeout_seconds,
                    read_timeout=config.timeout_seconds,
                ),
            )
        return client


class S3Store:
    """``s3://bucket/prefix``: keys are relative to the prefix. boto3's standard credential
    chain; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` point it at MinIO or moto."""

    def __init__(self, uri: str, config: StorageConfig) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.config = config
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._client_lock = threading.Lock()
        self._client_obj: Any = None
        self._transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold_mib * 2**20,
            multipart_chunksize=config.multipart_threshold_mib * 2**20,
            max_concurrency=4,
        )

    def __getstate__(self) -> dict[str, Any]:
        # boto3 clients and locks do not pickle; a copy makes its own.
        return {"uri": self.uri, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["config"])

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = s3_client(self.config)
            return self._client_obj

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _call(self, action: str, key: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, action, self.bucket, self.prefix + key) from None
        except S3UploadFailedError as exc:  # s3transfer wraps the ClientError of a multipart
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise storage_error(cause, action, self.bucket, self.prefix + key) from None
            raise StorageUnavailable(f'cannot {action} "{self.uri_of(key)}": {exc}') from None

    def check(self) -> None:
        """Fail fast (one line) when the bucket is missing or not ours to use."""
        try:
            self._call("open bucket", "", self.client.head_bucket)
        except ObjectMissing:
            raise StorageError(
                f'cannot open bucket "s3://{self.bucket}/": NoSuchBucket (it does not exist)'
            ) from None

    def list(self) -> Iterator[ObjectRef]:

        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if not key or (key.endswith("/") and obj["Size"] == 0):
                        continue  # the prefix itself or a "folder" marker: no data
                    etag = obj.get("ETag", "").strip('"')
                    yield ObjectRef(self.uri_of(key), key, obj["Size"], etag)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "list", self.bucket, self.prefix) from None

    def get_range(self, key: str, first: int, last: int) -> tuple[bytes, int]:
        """Bytes [first, last] of the object and its total size (HTTP Range, RFC 9110 14.1)."""
        with self._slots:
            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={first}-{last}"
                )
                with contextlib.closing(resp["Body"]) as body:
                    data = body.read()  # a reset mid-body is a BotoCoreError too
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b"", first  # past the end (an empty object)
                raise storage_error(exc, "read", self.bucket, self.prefix + key) from None
            except BotoCoreError as exc:
                raise storage_error(exc, "read", self.bucket, self.prefix + key) from None
        total = resp.get("ContentRange", "").rpartition("/")[2]
        return data, int(total) if total.isdigit() else resp.get("ContentLength", len(data))

    @contextlib.contextmanager
    def open_header(self, key: str) -> Iterator[BinaryIO]:
        """The start of the object through ranged GETs (see :class:`RangedReader`)."""
        reader = RangedReader(self, key, self.config.header_bytes)
        with io.BufferedReader(reader, buffer_size=8192) as fh:
            yield fh  # type: ignore[misc]
        logger.debug("header of %s: %d ranged GETs", reader.name, reader.requests)

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """The whole object, streamed into an anonymous temporary file (ranged parallel parts
        past the multipart threshold), so a large object is never held whole in memory."""
        with tempfile.TemporaryFile(prefix="radflow-s3-") as tmp:
            with self._slots:  # bounds downloads in flight, not the decoding after them
                self._call(
                    "read",
                    key,
                    self.client.download_fileobj,
                    Key=self.prefix + key,
                    Fileobj=tmp,
                    Config=self._transfer,
                )
            tmp.seek(0)
            yield tmp  # type: ignore[misc]

    def read_bytes(self, key: str) -> bytes:
        """A small object whole (reports, manifests); inputs go through ``open_read``."""

        def get(**kwargs: Any) -> bytes:
            with contextlib.closing(self.client.get_object(**kwargs)["Body"]) as body:
                return body.read()

        return self._call("read", key, get, Key=self.prefix + key)

    def write_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        """One PUT (multipart past the threshold) with server-side encryption on every write."""
        extra = self.encryption()
        if content_type:
            extra["ContentType"] = content_type
        if len(data) < self._transfer.multipart_threshold:
            self._call(
                "write", key, self.client.put_object, Key=self.prefix + key, Body=data, **extra
            )
            return
        self._call(
            "write",
            key,
            self.client.upload_fileobj,
            Key=self.prefix + key,
            Fileobj=io.BytesIO(data),
            ExtraArgs=extra,
            Config=self._transfer,
        )

    def encryption(self) -> dict[str, str]:
        """PutObject arguments for the configured SSE (AES256, or aws:kms with a key id)."""
        extra = {"ServerSideEncryption": self.config.sse}
        if self.config.kms_key_id:
            extra["SSEKMSKeyId"] = self.config.kms_key_id
        return extra

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, self.client.head_object, Key=self.prefix + key)
        except ObjectMissing:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under the folder ``prefix``, by a paginated listing of that folder."""
        folder = prefix.rstrip("/") + "/"
        return [folder + ref.key for ref in S3Store(self.uri_of(folder), self.config).list()]

    def delete(self, key: str) -> None:
        """DeleteObject (S3 answers a missing key with success too)."""
        self._call("delete", key, self.client.delete_object, Key=self.prefix + key)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        def get(**kwargs: Any) -> tuple[bytes, str]:
            resp = self.client.get_object(**kwargs)
            with contextlib.closing(resp["Body"]) as body:
                return body.read(), resp["ETag"]

        try:
            return self._call("read", key, get, Key=self.prefix + key)
        except ObjectMissing:
            return None

    def _conditional(self, action: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """``fn``'s response, or None when its condition failed (S3 conditional requests:
        If-None-Match / If-Match on PutObject, If-Match on DeleteObject)."""
        try:
            return fn(Bucket=self.bucket, Key=self.prefix + key, **kwargs)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _CONDITION_FAILED:
                return None
            raise storage_error(exc, action, self.bucket, self.prefix + key) from None
        except BotoCoreError as exc:
            raise storage_error(exc, action, self.bucket, self.prefix + key) from None

    def put_if(
        self, key: str, data: bytes, version: str | None, content_type: str = ""
    ) -> str | None:
        """One PutObject with ``If-None-Match: *`` (no object yet) or ``If-Match: <ETag>``."""
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        extra = {**self.encryption(), **({"ContentType": content_type} if content_type else {})}
        resp = self._conditional(
            "write", key, self.client.put_object, Body=data, **condition, **extra
        )
        return None if resp is None else resp["ETag"]

    def delete_if(self, key: str, version: str) -> bool:
        """DeleteObject with ``If-Match: <ETag>`` (S3 general purpose buckets since 2025-09)."""
        return (
            self._conditional("delete", key, self.client.delete_object, IfMatch=version) is not None
        )
