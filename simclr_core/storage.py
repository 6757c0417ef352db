"""Storage for every step: local paths, ``gs://bucket/prefix`` and ``s3://bucket/prefix`` URIs, through one interface.

Nothing is ever half-written. Locally a file is written to a temporary name beside its target,
fsynced and renamed. On Google Cloud Storage an object appears only when its upload completes
(large files go up as resumable uploads), and writers that need a commit point (checkpoints, a
prepared dataset) write a small pointer or manifest object last.

GCS goes through the official ``google-cloud-storage`` client (no gsutil subprocesses). It
finds credentials the usual way (workload identity, ``GOOGLE_APPLICATION_CREDENTIALS``), or
talks to an emulator when ``STORAGE_EMULATOR_HOST`` is set. Transient errors (connection
resets, 429, 5xx) are retried with exponential backoff for up to ``SIMCLR_GCS_RETRY_SECONDS``
seconds (default 120; a finite number in (0, 86400]), then raise :class:`StorageUnavailable`.
A URI without a bucket or with a bucket name that breaks the service's naming rules, a missing
bucket or object, or denied access raise :class:`StorageError`, naming the URI.

S3 and S3-compatible stores (MinIO, which ships with Kubeflow; Ceph; ...) go through boto3. It
finds credentials the usual way (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, IRSA
or an instance role) and the endpoint in ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), e.g.
``http://minio-service.kubeflow:9000``; with an endpoint set, buckets are addressed by path, as
MinIO expects. Retries use botocore's standard mode for ``SIMCLR_S3_MAX_ATTEMPTS`` attempts (10).
Objects appear only when their (multipart) upload completes, as on GCS.

Steps that need a local directory (a prepared dataset is memory-mapped) use
:func:`staged_input` / :func:`staged_output`, which download or upload a whole tree. A store is a
context manager: closing it removes the local scratch directory of a gs:// or s3:// store.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, Iterator

__all__ = [
    "StorageError", "StorageUnavailable", "Store", "LocalStore", "GCSStore", "S3Store", "open_store", "is_remote",
    "split_gs_uri", "split_uri", "join", "read_bytes", "sha256_file", "staged_input", "staged_output", "write_atomic", "write_text", "write_json",
]

log = logging.getLogger("simclr.storage")

GS_PREFIX = "gs://"
S3_PREFIX = "s3://"
REMOTE_PREFIXES = (GS_PREFIX, S3_PREFIX)
RESUMABLE_CHUNK_BYTES = 16 * 1024 * 1024  # files above this go up in resumable chunks
_RETRY_SECONDS_ENV = "SIMCLR_GCS_RETRY_SECONDS"
_MAX_RETRY_SECONDS = 86400.0  # a day: past that a "retry" is a hang


class StorageError(ValueError):
    """A URI that cannot work: no bucket, a missing bucket or object, access denied."""


class StorageUnavailable(RuntimeError):
    """Storage did not answer (after retries): the network, the service, or the emulator is down."""


# ------------------------------------------------------------------------------ local files


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once (at import, before any thread)
    os.umask(mask)
    return mask


# mkstemp makes files 0600; outputs get the mode open() would give them (0644 under the usual
# umask), so another uid on a shared volume can read them, as it can read np.save's files
OUTPUT_FILE_MODE = 0o666 & ~_umask()


def make_shareable(fd: int) -> None:
    """Give the file open as ``fd`` (from mkstemp) the mode of an ordinary output file."""
    os.fchmod(fd, OUTPUT_FILE_MODE)


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Call ``write(stream)`` on a temporary file beside ``path``, fsync, then rename it to ``path``.

    Readers see the old file or the new one, never half of one; on failure nothing is left.
    The file gets the mode of an ordinary output (:data:`OUTPUT_FILE_MODE`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        make_shareable(handle)
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda stream: stream.write(text))


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None: JSON has no NaN, and null says "not defined"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically; a non-finite float is written as null."""
    write_text(path, json.dumps(_finite(value), indent=2, sort_keys=True, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------ URIs


def is_remote(uri: str | Path) -> bool:
    """True for gs:// and s3:// URIs (everything else is a local path)."""
    return str(uri).startswith(REMOTE_PREFIXES)


def split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ("s3://", "bucket", "a/b").

    A URI without a bucket, or whose bucket name breaks the service's naming rules, is a
    StorageError naming the URI and the rule: the client libraries would otherwise fail later
    with a ValueError, or send the name (a newline and all) in a request.
    """
    scheme = next(prefix for prefix in REMOTE_PREFIXES if uri.startswith(prefix))
    bucket, _, key = uri[len(scheme) :].partition("/")
    if not bucket or bucket in (".", ".."):
        raise StorageError(f"{uri!r} names no bucket: expected {scheme}BUCKET/PATH")
    broken = _bucket_name_problem(bucket, gcs=scheme == GS_PREFIX)
    if broken:
        raise StorageError(f"{uri!r} is not a valid {scheme} URI: the bucket name {bucket!r} {broken}")
    return scheme, bucket, key.strip("/")


# Bucket naming rules: https://cloud.google.com/storage/docs/buckets#naming and
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html. The reserved
# S3 prefixes and suffixes are left out: they name access points and directory buckets, which
# are addressed like buckets.
_GCS_BUCKET_CHARS = re.compile(r"[a-z0-9._-]+")
_S3_BUCKET_CHARS = re.compile(r"[a-z0-9.-]+")


def _bucket_name_problem(name: str, gcs: bool) -> str | None:
    """Which naming rule ``name`` breaks (a phrase to follow "the bucket name ..."), or None."""
    longest = 222 if gcs and "." in name else 63
    if not 3 <= len(name) <= longest:
        return f"must be 3 to {longest} characters long, not {len(name)}" + (" (up to 222 with dots)" if gcs and longest == 63 else "")
    if not (_GCS_BUCKET_CHARS if gcs else _S3_BUCKET_CHARS).fullmatch(name):  # fullmatch: a trailing newline too
        allowed = "lowercase letters, digits, dashes, underscores and dots" if gcs else "lowercase letters, digits, dashes and dots"
        return f"may contain only {allowed}"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must start and end with a letter or a digit"
    if ".." in name:
        return "must not contain two dots in a row"
    if gcs and any(len(part) > 63 for part in name.split(".")):
        return "must not have a dot-separated part longer than 63 characters"
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(name)
        return "must not be an IP address"
    return None


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ("bucket", "a/b"); a URI without a bucket is a StorageError."""
    _, bucket, key = split_uri(uri)
    return bucket, key


def join(uri: str | Path, *parts: str) -> str:
    """Join path parts onto a local path or a gs:// or s3:// URI."""
    if is_remote(uri):
        return "/".join([str(uri).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(uri, *parts))


# ------------------------------------------------------------------------------ stores


class Store:
    """Files under one root (a directory or a gs:// prefix), addressed by relative keys ``a/b.pt``.

    Use it as a context manager (or call :meth:`close`) so that local scratch space goes away.
    """

    root: str

    def close(self) -> None:
        """Release what the store holds locally (a remote store's scratch directory)."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def uri(self, key: str) -> str:
        return join(self.root, key)

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def size(self, key: str) -> int:
        """Bytes of the regular file or object ``key``; a StorageError when it is missing or not
        a regular file (a FIFO or a device would make a read hang or never end)."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` all at once (readers never see part of it)."""
        raise NotImplementedError

    def put_file(self, local_path: Path, key: str) -> None:
        """Move (locally) or upload (GCS) the finished file ``local_path`` to ``key``; it is consumed."""
        raise NotImplementedError

    def get_file(self, key: str, local_path: Path) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def scratch_dir(self) -> Path:
        """A local directory for files on their way into this store (same filesystem when local)."""
        raise NotImplementedError


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.path = Path(root)

    def exists(self, key: str) -> bool:
        return (self.path / key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri(key)} does not exist") from None

    def size(self, key: str) -> int:
        try:
            info = os.stat(self.path / key)  # follows a link: what a read would read
        except FileNotFoundError:
            raise StorageError(f"{self.uri(key)} does not exist") from None
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"{self.uri(key)} is not a regular file")
        return info.st_size

    def write_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self.path / key, lambda stream: stream.write(data), mode="wb")

    def put_file(self, local_path: Path, key: str) -> None:
        target = self.path / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, target)

    def get_file(self, key: str, local_path: Path) -> None:
        try:
            shutil.copyfile(self.path / key, local_path)
        except FileNotFoundError:
            raise StorageError(f"{self.uri(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self.path / prefix
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.path)) for p in base.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        (self.path / key).unlink(missing_ok=True)

    def scratch_dir(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path


def _retry_seconds() -> float:
    """SIMCLR_GCS_RETRY_SECONDS: finite and in (0, 86400]. NaN would compare false against the
    deadline and retry forever; 0 or less would never retry at all."""
    value = os.environ.get(_RETRY_SECONDS_ENV, "120")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= _MAX_RETRY_SECONDS):
        raise StorageError(f"{_RETRY_SECONDS_ENV}={value!r}: expected a number of seconds in (0, {_MAX_RETRY_SECONDS:g}]")
    return seconds


class _BucketStore(Store):
    """What the object stores share: ``scheme://bucket/prefix`` addressing and a scratch directory."""

    def __init__(self, uri: str) -> None:
        scheme, self.bucket_name, self.prefix = split_uri(uri)
        self.root = f"{scheme}{self.bucket_name}" + (f"/{self.prefix}" if self.prefix else "")
        self._scratch: Path | None = None

    def _name(self, key: str) -> str:
        """The object name of ``key``."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list_start(self, prefix: str) -> str:
        start = self._name(prefix).rstrip("/")
        return f"{start}/" if start else ""

    def _keys(self, names: list[str]) -> list[str]:
        """Object names -> keys relative to the root (directory placeholders dropped), sorted."""
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(name[cut:] for name in names if not name.endswith("/"))

    def scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="simclr-upload-"))
            # a safety net for a store never closed: removed when it is collected or at exit
            self._remove_scratch = weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        return self._scratch

    def close(self) -> None:
        """Remove the scratch directory (a half-written upload in it is of no use to anyone)."""
        if self._scratch is not None:
            self._remove_scratch()
            self._scratch = None


class GCSStore(_BucketStore):
    """Objects under ``gs://bucket/prefix`` through google-cloud-storage, with retries."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        seconds = _retry_seconds()
        self._retry: Retry = DEFAULT_RETRY.with_timeout(seconds) if hasattr(DEFAULT_RETRY, "with_timeout") else DEFAULT_RETRY.with_deadline(seconds)
        self._timeout = (10, 120)  # (connect, read) seconds per request
        self._bucket = _client().bucket(self.bucket_name)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate the client's exceptions into ours, naming ``what`` (a URI)."""
        from google.api_core import exceptions as gexc

        try:
            yield
        except gexc.NotFound:
            if not self._bucket_exists():
                raise StorageError(f"bucket gs://{self.bucket_name} does not exist (while accessing {what})") from None
            raise StorageError(f"{what} does not exist") from None
        except gexc.Forbidden as error:
            raise StorageError(f"access to {what} denied: {error.message}") from None
        except gexc.Unauthorized as error:
            raise StorageError(f"no valid credentials for {what}: {error.message}") from None
        except (gexc.RetryError, gexc.ServerError, gexc.TooManyRequests, ConnectionError, TimeoutError) as error:
            raise StorageUnavailable(f"{what}: storage did not answer within {_retry_seconds():g} s ({_short(error)})") from None
        except Exception as error:  # requests' ConnectionError is not the builtin one
            if type(error).__module__.startswith(("requests", "urllib3", "google.auth")):
                raise StorageUnavailable(f"{what}: {_short(error)}") from None
            raise

    def _bucket_exists(self) -> bool:
        try:
            return self._bucket.exists(retry=self._retry, timeout=self._timeout)
        except Exception:
            return True  # cannot tell: report the object

    def exists(self, key: str) -> bool:
        with self._errors(self.uri(key)):
            return self._bucket.blob(self._name(key)).exists(retry=self._retry, timeout=self._timeout)

    def read_bytes(self, key: str) -> bytes:
        with self._errors(self.uri(key)):
            return self._bucket.blob(self._name(key)).download_as_bytes(retry=self._retry, timeout=self._timeout)

    def size(self, key: str) -> int:
        with self._errors(self.uri(key)):
            blob = self._bucket.get_blob(self._name(key), retry=self._retry, timeout=self._timeout)
        if blob is None:
            raise StorageError(f"{self.uri(key)} does not exist")
        return int(blob.size)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(self.uri(key)):
            # Rewriting an object with the same bytes is idempotent: safe to retry unconditionally.
            self._bucket.blob(self._name(key)).upload_from_string(data, retry=self._retry, timeout=self._timeout)

    def put_file(self, local_path: Path, key: str) -> None:
        size = local_path.stat().st_size
        blob = self._bucket.blob(self._name(key), chunk_size=RESUMABLE_CHUNK_BYTES if size > RESUMABLE_CHUNK_BYTES else None)
        with self._errors(self.uri(key)):
            blob.upload_from_filename(str(local_path), retry=self._retry, timeout=self._timeout)
        local_path.unlink()

    def get_file(self, key: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(f".{local_path.name}.part")
        with self._errors(self.uri(key)):
            self._bucket.blob(self._name(key)).download_to_filename(str(partial), retry=self._retry, timeout=self._timeout)
        os.replace(partial, local_path)

    def list(self, prefix: str = "") -> list[str]:
        with self._errors(self.uri(prefix)):
            blobs = self._bucket.client.list_blobs(self._bucket, prefix=self._list_start(prefix), retry=self._retry, timeout=self._timeout)
            return self._keys([blob.name for blob in blobs])

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        with self._errors(self.uri(key)):
            try:
                self._bucket.blob(self._name(key)).delete(retry=self._retry, timeout=self._timeout)
            except gexc.NotFound:
                pass


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


_CLIENT = None


def _client():
    """One google-cloud-storage client per process (anonymous when an emulator is configured)."""
    global _CLIENT
    if _CLIENT is None:
        from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            _CLIENT = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"), credentials=AnonymousCredentials())
        else:
            try:
                _CLIENT = storage.Client()
            except Exception as error:  # google.auth.exceptions.DefaultCredentialsError and kin
                raise StorageError(f"cannot reach Google Cloud Storage: {_short(error)}") from None
    return _CLIENT


class S3Store(_BucketStore):
    """Objects under ``s3://bucket/prefix`` through boto3 (AWS S3 or an S3-compatible server)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._client = _s3_client()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate botocore's exceptions into ours, naming ``what`` (a URI)."""
        from botocore import exceptions as bexc

        try:
            yield
        except bexc.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            message = error.response.get("Error", {}).get("Message", "") or code
            if code == "NoSuchBucket":
                raise StorageError(f"bucket s3://{self.bucket_name} does not exist (while accessing {what})") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"{what} does not exist") from None
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
                raise StorageError(f"access to {what} denied: {message}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                raise StorageError(f"no valid credentials for {what}: {message}") from None
            if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout") or code.startswith("5"):
                raise StorageUnavailable(f"{what}: storage did not answer ({code}: {message})") from None
            raise StorageError(f"{what}: {code}: {message}") from None
        except bexc.NoCredentialsError:
            raise StorageError(
                f"no credentials for {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role)"
            ) from None
        except (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError, bexc.ConnectionClosedError) as error:
            raise StorageUnavailable(f"{what}: {_short(error)}") from None

    def exists(self, key: str) -> bool:
        from botocore import exceptions as bexc

        with self._errors(self.uri(key)):
            try:
                self._client.head_object(Bucket=self.bucket_name, Key=self._name(key))
                return True
            except bexc.ClientError as error:
                if str(error.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise
        try:  # a missing bucket is an error, not a missing object (HEAD answers carry no error code)
            self._client.head_bucket(Bucket=self.bucket_name)
        except bexc.ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"bucket s3://{self.bucket_name} does not exist (while accessing {self.uri(key)})") from None
            with self._errors(self.uri(key)):
                raise
        return False

    def read_bytes(self, key: str) -> bytes:
        with self._errors(self.uri(key)):
            return self._client.get_object(Bucket=self.bucket_name, Key=self._name(key))["Body"].read()

    def size(self, key: str) -> int:
        with self._errors(self.uri(key)):
            return int(self._client.head_object(Bucket=self.bucket_name, Key=self._name(key))["ContentLength"])

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(self.uri(key)):
            self._client.put_object(Bucket=self.bucket_name, Key=self._name(key), Body=data)

    def put_file(self, local_path: Path, key: str) -> None:
        with self._errors(self.uri(key)):
            self._client.upload_file(str(local_path), self.bucket_name, self._name(key))  # multipart above 8 MiB
        local_path.unlink()

    def get_file(self, key: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(f".{local_path.name}.part")
        with self._errors(self.uri(key)):
            self._client.download_file(self.bucket_name, self._name(key), str(partial))
        os.replace(partial, local_path)

    def list(self, prefix: str = "") -> list[str]:
        names: list[str] = []
        with self._errors(self.uri(prefix)):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket_name, Prefix=self._list_start(prefix)):
                names += [item["Key"] for item in page.get("Contents", [])]
        return self._keys(names)

    def delete(self, key: str) -> None:
        with self._errors(self.uri(key)):
            self._client.delete_object(Bucket=self.bucket_name, Key=self._name(key))  # no error when absent


_S3_ATTEMPTS_ENV = "SIMCLR_S3_MAX_ATTEMPTS"


def _s3_client():
    """A boto3 S3 client: the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (botocore
    reads them itself), path-style addressing when one is set, standard-mode retries."""
    import boto3
    from botocore.config import Config

    value = os.environ.get(_S3_ATTEMPTS_ENV, "10")
    try:
        attempts = int(value)
    except ValueError:
        attempts = 0
    if not 1 <= attempts <= 100:  # 0 or less is no attempt at all, not "one"
        raise StorageError(f"{_S3_ATTEMPTS_ENV}={value!r}: expected a whole number of attempts in [1, 100]")
    custom_endpoint = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    config = Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=10, read_timeout=120,
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", config=config)


def open_store(uri: str | Path) -> Store:
    """The store rooted at ``uri``: a local directory, a gs:// or an s3:// prefix."""
    text = str(uri)
    if text.startswith(GS_PREFIX):
        return GCSStore(text)
    if text.startswith(S3_PREFIX):
        return S3Store(text)
    return LocalStore(uri)


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of one file or object."""
    if is_remote(uri):
        parent, _, name = str(uri).rstrip("/").rpartition("/")
        if not name or parent in ("gs:", "gs:/", "s3:", "s3:/"):
            raise StorageError(f"{uri!r} names no object: expected {split_uri(str(uri))[0]}BUCKET/PATH")
        with open_store(parent) as store:
            return store.read_bytes(name)
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None


# ------------------------------------------------------------------------------ whole trees


@contextlib.contextmanager
def staged_input(uri: str | Path) -> Iterator[Path]:
    """A local directory holding the tree at ``uri``: the path itself, or a download of the prefix."""
    if not is_remote(uri):
        yield Path(uri)
        return
    with open_store(uri) as store, tempfile.TemporaryDirectory(prefix="simclr-input-") as local:
        keys = store.list()
        if not keys:
            raise StorageError(f"{uri} holds no objects")
        log.info("downloading %d object(s) from %s", len(keys), uri)
        download_all(store, keys, Path(local))
        yield Path(local)


DOWNLOAD_THREADS = 16  # objects in flight: an image folder is many small objects, each a round trip


def download_all(store: Store, keys: list[str], local: Path, threads: int = DOWNLOAD_THREADS) -> None:
    """Every key of ``store`` to ``local/key``, ``threads`` at a time, with a progress bar in objects.

    The clients are shared across threads (both google-cloud-storage's and boto3's are safe to
    share); at most ``4 * threads`` downloads are queued, so a million keys do not become a
    million futures. The first failure stops the rest and is raised.
    """
    import collections
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    bar = tqdm(total=len(keys), unit="obj", desc="download", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, disable=len(keys) < 2)
    pending: collections.deque = collections.deque()
    with bar, ThreadPoolExecutor(threads) as pool:
        try:
            for key in keys:
                pending.append(pool.submit(store.get_file, key, local / key))
                if len(pending) >= 4 * threads:
                    pending.popleft().result()
                    bar.update()
            while pending:
                pending.popleft().result()
                bar.update()
        finally:
            for future in pending:
                future.cancel()


@contextlib.contextmanager
def staged_output(uri: str | Path, upload: bool = True, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local directory whose files end up at ``uri`` when the block succeeds.

    Local paths are used as they are. For gs:// and s3:// the block writes into a temporary directory that
    is uploaded afterwards (when ``upload``), files named in ``last`` after all others so that
    their presence means the rest is complete. On failure nothing is uploaded.
    """
    if not is_remote(uri):
        yield Path(uri)
        return
    with open_store(uri) as store, tempfile.TemporaryDirectory(prefix="simclr-output-") as scratch:
        local = Path(scratch, "out")  # not created: writers that create their directory work too
        yield local
        if upload and local.is_dir():
            upload_tree(local, store, last=last)


def upload_tree(local: Path, store: Store, last: tuple[str, ...] = ()) -> None:
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda key: key in last)
    log.info("uploading %d file(s) to %s", len(files), store.root)
    for key in files:
        store.put_file(local / key, key)
