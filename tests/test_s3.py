"""s3:// through boto3, against moto's S3 server on 127.0.0.1 (an S3-compatible endpoint, as
MinIO is in a Kubeflow installation).

The server runs as its own process; ``AWS_ENDPOINT_URL_S3`` points the client at it, exactly
as a user points it at MinIO (``http://minio-service.kubeflow:9000``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from simclr_core import storage
from simclr_core.checkpoint import load_checkpoint
from simclr_core.storage import StorageError, StorageUnavailable, open_store, staged_input
from tests.conftest import TINY_PRETRAIN, prepare_remote_imagefolder, run_cli, upload_imagefolder
from tests.multiproc import free_port, start_server, stop_server

BUCKET = "simclr-s3-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio123", "AWS_DEFAULT_REGION": "us-east-1"}


def _server_binary() -> str:
    binary = Path(sys.executable).with_name("moto_server")
    if not binary.exists():
        pytest.skip("moto's server is not installed (pip install -e '.[test]')")
    return str(binary)


@pytest.fixture(scope="module")
def s3_server():
    """The server's URL, with the bucket made; the endpoint and credentials are set for this
    process and its children."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server([_server_binary(), "-H", "127.0.0.1", "-p", str(port)], f"{url}/moto-api/", "moto's S3 server")
    saved = {name: os.environ.get(name) for name in (*CREDENTIALS, "AWS_ENDPOINT_URL_S3")}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=url)
    storage._s3_client().create_bucket(Bucket=BUCKET)
    yield url
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    stop_server(process)


def _uri(*parts: str) -> str:
    return "/".join([f"s3://{BUCKET}", *parts])


def test_store_round_trip_multipart_list_and_delete(s3_server, tmp_path):
    store = open_store(_uri("roundtrip"))
    assert isinstance(store, storage.S3Store) and store.root == _uri("roundtrip")
    store.write_bytes("a/one.json", b'{"x": 1}')
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024 + 12345))  # above boto3's 8 MiB threshold: a multipart upload
    expected = big.read_bytes()
    store.put_file(big, "b/big.bin")
    assert not big.exists()  # put_file consumes the local file
    assert store.list() == ["a/one.json", "b/big.bin"]
    assert store.list("a") == ["a/one.json"]
    assert store.read_bytes("a/one.json") == b'{"x": 1}'
    assert storage.read_bytes(_uri("roundtrip", "a", "one.json")) == b'{"x": 1}'
    store.get_file("b/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == expected
    assert store.exists("b/big.bin") and not store.exists("a/missing.json")
    store.delete("a/one.json")
    store.delete("a/one.json")  # deleting twice is fine
    assert store.list() == ["b/big.bin"] and not store.exists("a/one.json")


def test_clear_errors_for_missing_bucket_object_and_no_bucket(s3_server):
    with pytest.raises(StorageError, match="names no bucket: expected s3://BUCKET/PATH"):
        open_store("s3:///data")
    with pytest.raises(StorageError, match="bucket s3://no-such-bucket does not exist"):
        open_store("s3://no-such-bucket/run").read_bytes("x.pt")
    with pytest.raises(StorageError, match="bucket s3://no-such-bucket does not exist"):
        open_store("s3://no-such-bucket/run").exists("x.pt")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/missing/x\.pt does not exist"):
        open_store(_uri("missing")).read_bytes("x.pt")
    with pytest.raises(StorageError, match="holds no objects"):
        with staged_input(_uri("nothing-here")):
            pass


def test_denied_access_is_a_clear_error(s3_server, monkeypatch):
    """moto grants everything; the 403 an S3 server answers is made at botocore's request."""
    from botocore.exceptions import ClientError

    store = open_store(_uri("private"))

    def denied(**kwargs):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied."}}, "GetObject")

    monkeypatch.setattr(store._client, "get_object", denied)
    with pytest.raises(StorageError, match=rf"access to s3://{BUCKET}/private/x\.pt denied: Access Denied\."):
        store.read_bytes("x.pt")


def test_unreachable_endpoint_is_retried_then_reported(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("SIMCLR_S3_MAX_ATTEMPTS", "2")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = open_store(_uri("run"))
    attempts = []
    store._client.meta.events.register("before-send.s3.GetObject", lambda **kwargs: attempts.append(1))
    with pytest.raises(StorageUnavailable, match="Could not connect to the endpoint URL"):
        store.read_bytes("x.pt")
    assert len(attempts) == 2  # SIMCLR_S3_MAX_ATTEMPTS, then it gave up


@pytest.mark.parametrize("value", ["0", "-3", "ten", "1000"])
def test_a_bad_attempt_count_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("SIMCLR_S3_MAX_ATTEMPTS", value)
    with pytest.raises(StorageError, match=rf"SIMCLR_S3_MAX_ATTEMPTS='{value}': expected a whole number of attempts in \[1, 100\]"):
        open_store(_uri("run"))


def test_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="no credentials for s3://bkt/run/x.pt: set AWS_ACCESS_KEY_ID"):
        open_store("s3://bkt/run").read_bytes("x.pt")  # "b" breaks the 3-character minimum


def test_prepare_pretrain_and_linear_eval_read_and_write_s3(s3_server, tiny_folder, tmp_path):
    """The CLI, as the pipeline's steps run it: prepare from s3://, pretrain to s3://, linear eval from s3://."""
    upload_imagefolder(tiny_folder, open_store(_uri("e2e", "images")), tmp_path)

    prepared, run, evaluation = _uri("e2e", "prepared"), _uri("e2e", "run"), _uri("e2e", "linear")
    prepare_remote_imagefolder(_uri("e2e", "images"), prepared)
    manifest = json.loads(open_store(prepared).read_bytes("manifest.json"))
    assert manifest["splits"]["test"]["images"] == 18  # tiny_folder: 3 classes x 6 test images

    result = run_cli("pretrain", "--data", prepared, "--out", run, "--device", "cpu", *TINY_PRETRAIN)
    assert result.returncode == 0, result.stderr
    assert {"model.pt", "live/metrics.json", "checkpoints/latest.json"} <= set(open_store(run).list())
    assert load_checkpoint(f"{run}/model.pt")["step"] > 0

    result = run_cli("linear-eval", "--model", f"{run}/model.pt", "--data", prepared, "--out", evaluation, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert {"top1", "random_init_top1"} <= set(json.loads(open_store(evaluation).read_bytes("metrics.json")))
