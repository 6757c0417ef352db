"""Storage under hostile conditions: invalid bucket names and retry settings, scratch space left
in TMPDIR by gs:// runs, and two runs writing to one run directory.

The bucket and retry rows fail before any request (no emulator). The scratch test runs a real
gs:// pretraining against the GCS emulator of test_gcs.py. The lock tests hold the lock from a
child process (the holder a second run must name) or leave it behind with a real SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from simclr_core import storage
from simclr_core.runlock import LOCK_NAME, RunLocked, run_lock
from simclr_core.storage import StorageError, split_uri
from tests.conftest import TINY_PRETRAIN, cli_env, run_cli
from tests.test_bad_inputs import _cli
from tests.test_gcs import BUCKET, emulator  # noqa: F401  (the emulator fixture)

OK, FAILURE, USAGE = 0, 1, 2

# ------------------------------------------------------------------------------ bucket names and retry settings

BAD_BUCKETS = [
    ("gs://_bucket/x", "must start and end with a letter or a digit"),
    ("gs://-x-/data", "must start and end with a letter or a digit"),
    ("gs://bucket-/data", "must start and end with a letter or a digit"),
    ("gs://buc\nket/x", "may contain only lowercase letters"),
    ("gs://bucket\n/x", "may contain only lowercase letters"),  # a trailing newline: the classic `$` slip
    ("gs://MyBucket/x", "may contain only lowercase letters"),
    ("gs://my bucket/x", "may contain only lowercase letters"),
    ("gs://" + "a" * 64 + "/x", "must be 3 to 63 characters long, not 64"),
    ("gs://" + "a." * 111 + "bc/x", "must be 3 to 222 characters long, not 224"),
    ("gs://" + "a" * 64 + ".b/x", "dot-separated part longer than 63"),
    ("gs://a/b", "must be 3 to 63 characters long, not 1"),
    ("gs://ab/x", "must be 3 to 63 characters long, not 2"),
    ("gs://a..b/x", "two dots in a row"),
    ("gs://192.168.5.4/x", "must not be an IP address"),
    ("s3://my_bucket/x", "may contain only lowercase letters, digits, dashes and dots"),
    ("s3://Bucket/x", "may contain only lowercase letters"),
    ("s3://ab/x", "must be 3 to 63 characters long, not 2"),
    ("s3://" + "a." * 40 + "b/x", "must be 3 to 63 characters long, not 81"),
    ("s3://a..b/x", "two dots in a row"),
    ("s3://.abc/x", "must start and end with a letter or a digit"),
    ("s3://10.0.0.1/x", "must not be an IP address"),
]


@pytest.mark.parametrize("uri,rule", BAD_BUCKETS, ids=[f"{i}-{uri[:12]!r}" for i, (uri, _) in enumerate(BAD_BUCKETS)])
def test_invalid_bucket_name_is_exit_2_naming_uri_and_rule(uri, rule, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./params.yaml
    code = _cli(["pretrain", "--data", uri, "--out", tmp_path / "out", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == USAGE, stderr
    assert "Traceback" not in stderr
    assert f"simclr pretrain: error: {uri!r} is not a valid" in stderr and rule in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri", [
    "gs://my-bucket/x", "gs://simclr_test/a/b", "gs://abc", "gs://" + "a" * 63, "gs://" + ".".join(["a" * 63] * 3) + "/x",
    "s3://my-bucket/x", "s3://a.b.c/x", "s3://" + "a" * 63, "s3://name--usw2-az1--x-s3/x",  # a directory bucket
])
def test_valid_bucket_names_are_accepted(uri):
    assert split_uri(uri)[1] == uri.split("/")[2]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "", "1e999", "86401", "ten"])
def test_bad_retry_seconds_is_exit_2_naming_the_variable(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMCLR_GCS_RETRY_SECONDS", value)
    monkeypatch.setattr(storage, "_CLIENT", None)
    code = _cli(["pretrain", "--data", "gs://my-bucket/data", "--out", tmp_path / "out", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == USAGE, stderr
    assert "Traceback" not in stderr
    assert f"simclr pretrain: error: SIMCLR_GCS_RETRY_SECONDS={value!r}: expected a number of seconds in (0, 86400]" in stderr, stderr


# ------------------------------------------------------------------------------ scratch space of gs:// runs


def _simclr_temporaries(tmpdir: Path) -> list[str]:
    return sorted(path.name for path in tmpdir.iterdir() if path.name.startswith("simclr-"))


@pytest.mark.parametrize("fault", [None, ("nan-at-step", 5)], ids=["succeeds", "fails"])
def test_gcs_pretrain_leaves_no_scratch_in_tmpdir(emulator, tiny_prepared, tmp_path, fault):  # noqa: F811
    """Checkpoints are staged in simclr-upload-*: gone after the run, whether it succeeded or
    failed (a NaN loss after two checkpoints were uploaded: exit 1)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    run = f"gs://{BUCKET}/scratch-{'fails' if fault else 'succeeds'}"
    result = run_cli("pretrain", "--data", tiny_prepared, "--out", run, "--device", "cpu", *TINY_PRETRAIN,
                     "--checkpoint-every", "2", env={"TMPDIR": str(tmpdir)}, fault=fault)
    assert result.returncode == (FAILURE if fault else OK), result.stderr
    assert "checkpoints/latest.json" in storage.open_store(run).list()  # the scratch was used
    assert _simclr_temporaries(tmpdir) == []
    assert "no lock keeps a second run from writing there" in result.stderr


def test_closing_a_bucket_store_removes_its_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_s3_client", lambda: None)  # no requests: only the scratch is used
    with storage.open_store("s3://my-bucket/run") as store:
        scratch = store.scratch_dir()
        (scratch / "checkpoints").mkdir()
        (scratch / "checkpoints" / ".step-1.tmp").write_bytes(b"half")
    assert not scratch.exists()


# ------------------------------------------------------------------------------ one run per directory


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class _Holder:
    """A child process holding the lock of ``out`` through :func:`run_lock` until stopped."""

    def __init__(self, out: Path, beside: bool = False) -> None:
        script = "import sys\nfrom simclr_core.runlock import run_lock\nwith run_lock(sys.argv[1], beside=sys.argv[2] == '1'):\n" \
                 "    print('held', flush=True)\n    sys.stdin.read()\n"
        argv = [sys.executable, "-c", script, str(out), "1" if beside else "0"]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=cli_env(), text=True)
        assert self.process.stdout.readline() == "held\n"  # blocks until the lock is held (or the child died)

    def stop(self) -> int:
        self.process.stdin.close()
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


def test_second_pretrain_on_a_locked_run_is_refused_and_touches_nothing(tiny_prepared, tiny_pretrained, tmp_path, monkeypatch, capsys):
    """The first run (its lock held by a child) has checkpoints and a checkpoint half-written; a
    second run with other settings would have cleared them all. It is refused, naming the holder."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    shutil.copytree(tiny_pretrained, out)
    (out / "checkpoints" / ".step-00000009.abc.tmp").write_bytes(b"the first run's checkpoint, half-written")
    holder = _Holder(out)
    try:
        before = _tree(out)
        code = _cli(["pretrain", "--data", tiny_prepared, "--out", out, "--device", "cpu", *TINY_PRETRAIN, "--temperature", "0.3"])
        stderr = capsys.readouterr().err
        assert code == USAGE, stderr
        assert "Traceback" not in stderr
        assert f"simclr pretrain: error: {out} is in use by another run (pid {holder.process.pid} on host {socket.gethostname()}, started " in stderr
        assert "command " in stderr and "-c" in stderr
        assert _tree(out) == before
    finally:
        assert holder.stop() == 0
    assert not (out / LOCK_NAME).exists()  # released with its holder


def test_prepare_on_a_locked_out_is_refused_and_keeps_the_first_ones_temporaries(tiny_folder, tmp_path, monkeypatch, capsys):
    """prepare removes temporaries beside its --out left by killed runs: not those of a live one."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "data"
    in_flight = tmp_path / ".data.tmp-first"
    in_flight.mkdir()
    (in_flight / "train_images.npy").write_bytes(b"being written")
    holder = _Holder(out, beside=True)
    try:
        code = _cli(["prepare", "--source", "imagefolder", "--source-root", tiny_folder, "--out", out])
        stderr = capsys.readouterr().err
        assert code == USAGE, stderr
        assert f"{out} is in use by another run (pid {holder.process.pid} on host" in stderr
        assert (in_flight / "train_images.npy").read_bytes() == b"being written" and not out.exists()
    finally:
        assert holder.stop() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.tmp-first"]  # the lock file went with its holder


def test_stale_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(tiny_prepared, tmp_path):
    """A pretraining SIGKILLed right after its checkpoint of step 4 leaves its lock file; the
    rerun takes the lock over, says whose it was, resumes from step 4 and finishes."""
    out = tmp_path / "run"
    argv = ["pretrain", "--data", tiny_prepared, "--out", out, "--device", "cpu", *TINY_PRETRAIN, "--checkpoint-every", "2"]
    killed = run_cli(*argv, fault=("kill-after-checkpoint", 4))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["host"] == socket.gethostname() and "pretrain" in record["command"]

    resumed = run_cli(*argv)
    assert resumed.returncode == OK, resumed.stderr
    assert f"taking over the stale lock {out / LOCK_NAME} of a run that is gone (pid {record['pid']} on host " in resumed.stderr
    assert "at step 4 of" in resumed.stderr  # resumed, not restarted
    assert (out / "model.pt").is_file() and not (out / LOCK_NAME).exists()


def test_a_lock_holder_killed_with_sigkill_leaves_a_lock_that_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _Holder(out)
    with pytest.raises(RunLocked, match=rf"pid {holder.process.pid} on host "):
        with run_lock(out):
            pass
    holder.kill()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.process.pid  # left behind, stale
    with run_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_no_lock_for_object_store_outputs_and_none_on_other_ranks(tmp_path):
    with run_lock("gs://my-bucket/run") as remote, run_lock(tmp_path / "run", enabled=False) as other_rank:
        assert remote is None and other_rank is None
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_no_directory_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(StorageError):
        with run_lock(out):
            raise StorageError("the run failed before writing anything")
    assert not (tmp_path / "a").exists()
