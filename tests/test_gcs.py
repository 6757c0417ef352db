"""gs:// through the real google-cloud-storage client, against a GCS emulator on 127.0.0.1.

The emulator (PyPI's gcp-storage-emulator) is started by the fixture; ``STORAGE_EMULATOR_HOST``
points the client at it, exactly as a user would point it at one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from simclr_core import storage
from simclr_core.checkpoint import CheckpointManager, load_checkpoint
from simclr_core.storage import StorageError, StorageUnavailable, open_store, staged_input, staged_output
from tests.conftest import TINY_PRETRAIN, prepare_remote_imagefolder, run_cli, upload_imagefolder
from tests.multiproc import free_port, start_server, stop_server

BUCKET = "simclr-test"


def _emulator_binary() -> str:
    binary = Path(sys.executable).with_name("gcp-storage-emulator")
    if not binary.exists():
        pytest.skip("gcp-storage-emulator is not installed (pip install -e '.[test]')")
    return str(binary)


@pytest.fixture(scope="module")
def emulator():
    """The emulator's URL; STORAGE_EMULATOR_HOST is set for this process and its children."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(
        [_emulator_binary(), "start", "--host", "127.0.0.1", "--port", str(port), "--default-bucket", BUCKET, "--in-memory", "-q"],
        f"{url}/storage/v1/b", "the GCS emulator",
    )
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage._CLIENT = None
    yield url
    storage._CLIENT = None
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved
    stop_server(process)


def _uri(test_name: str, *parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", test_name, *parts])


def test_store_round_trip_list_and_delete(emulator, tmp_path):
    store = open_store(_uri("roundtrip"))
    store.write_bytes("a/one.json", b'{"x": 1}')
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(storage.RESUMABLE_CHUNK_BYTES + 12345))  # above the chunk: a resumable upload
    expected = big.read_bytes()
    store.put_file(big, "b/big.bin")
    assert not big.exists()  # put_file consumes the local file
    assert store.list() == ["a/one.json", "b/big.bin"]
    assert store.list("a") == ["a/one.json"]
    assert store.read_bytes("a/one.json") == b'{"x": 1}'
    store.get_file("b/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == expected
    store.delete("a/one.json")
    store.delete("a/one.json")  # deleting twice is fine
    assert store.list() == ["b/big.bin"] and not store.exists("a/one.json")


def test_clear_errors_for_missing_bucket_object_and_no_bucket(emulator):
    with pytest.raises(StorageError, match="names no bucket"):
        open_store("gs:///data")
    with pytest.raises(StorageError, match="bucket gs://no-such-bucket does not exist"):
        open_store("gs://no-such-bucket/run").read_bytes("x.pt")
    with pytest.raises(StorageError, match=rf"gs://{BUCKET}/missing/x\.pt does not exist"):
        open_store(f"gs://{BUCKET}/missing").read_bytes("x.pt")
    with pytest.raises(StorageError, match="holds no objects"):
        with staged_input(f"gs://{BUCKET}/nothing-here"):
            pass


def test_unreachable_storage_is_retried_then_reported(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("SIMCLR_GCS_RETRY_SECONDS", "2")
    monkeypatch.setattr(storage, "_CLIENT", None)
    import requests.adapters

    attempts = []
    send = requests.adapters.HTTPAdapter.send
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", lambda self, *a, **k: (attempts.append(1), send(self, *a, **k))[1])
    with pytest.raises(StorageUnavailable, match=r"did not answer within 2 s"):
        open_store(f"gs://{BUCKET}/run").read_bytes("x.pt")
    assert len(attempts) >= 2  # it retried, then gave up (counted, not timed: a loaded machine is slow)
    monkeypatch.setattr(storage, "_CLIENT", None)


def test_staged_output_uploads_only_on_success_and_the_named_files_last(emulator, monkeypatch):
    uploaded = []
    original = storage.GCSStore.put_file
    monkeypatch.setattr(storage.GCSStore, "put_file", lambda self, path, key: (uploaded.append(key), original(self, path, key)))
    with pytest.raises(RuntimeError):
        with staged_output(_uri("staged", "failed")) as out:
            out.mkdir()
            (out / "half.txt").write_text("x")
            raise RuntimeError("the step failed")
    assert open_store(_uri("staged", "failed")).list() == []
    with staged_output(_uri("staged", "ok"), last=("manifest.json",)) as out:
        (out / "sub").mkdir(parents=True)
        for name in ("manifest.json", "a.npy", "sub/z.npy"):
            (out / name).write_text(name)
    assert uploaded[-1] == "manifest.json" and sorted(uploaded) == ["a.npy", "manifest.json", "sub/z.npy"]


def test_checkpoints_on_gcs_keep_k_and_fall_back(emulator, caplog):
    manager = CheckpointManager(open_store(_uri("checkpoints")), keep_last=2)
    for step in (1, 2, 3):
        manager.save({"model": {"w": torch.full((2,), float(step))}, "step": step}, step)
    assert [meta["step"] for meta in manager.list()] == [3, 2]
    manager.store.write_bytes("checkpoints/step-00000003.pt", b"not the bytes the metadata promises")
    with caplog.at_level("WARNING"):
        state, meta = manager.load_latest()
    assert meta["step"] == 2 and state["step"] == 2 and "does not match" in caplog.text


def test_every_step_reads_and_writes_gs(emulator, tiny_folder, tmp_path):
    """prepare from gs://, pretrain to gs:// (killed, then resumed from gs://), linear eval from gs://."""
    upload_imagefolder(tiny_folder, open_store(_uri("e2e", "images")), tmp_path)

    prepared, run, evaluation = _uri("e2e", "prepared"), _uri("e2e", "run"), _uri("e2e", "linear")
    prepare_remote_imagefolder(_uri("e2e", "images"), prepared)
    assert "manifest.json" in open_store(prepared).list()

    pretrain = ["pretrain", "--data", prepared, "--out", run, "--device", "cpu", *TINY_PRETRAIN, "--checkpoint-every", "2"]
    killed = run_cli(*pretrain, fault=("kill-before-step", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads(open_store(run).read_bytes("checkpoints/latest.json"))["step"] == 4
    resumed = run_cli(*pretrain)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run}/checkpoints/step-00000004.pt at step 4 of 6" in resumed.stderr
    assert {"model.pt", "live/metrics.json"} <= set(open_store(run).list())
    assert load_checkpoint(f"{run}/model.pt")["step"] == 6

    result = run_cli("linear-eval", "--model", f"{run}/model.pt", "--data", prepared, "--out", evaluation, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(open_store(evaluation).read_bytes("metrics.json"))
    assert 0.0 <= metrics["top1"] <= 1.0 and 0.0 <= metrics["random_init_top1"] <= 1.0


def test_denied_access_is_a_clear_usage_error(emulator, monkeypatch):
    """The emulator grants everything; a 403 from the service is simulated at the client's blob."""
    from google.api_core import exceptions as gexc
    from google.cloud.storage import Blob

    def forbidden(self, *args, **kwargs):
        raise gexc.Forbidden("caller does not have storage.objects.get access")

    monkeypatch.setattr(Blob, "download_as_bytes", forbidden)
    with pytest.raises(StorageError, match=rf"access to gs://{BUCKET}/private/x\.pt denied: caller does not have"):
        open_store(_uri("private")).read_bytes("x.pt")
