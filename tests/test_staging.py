"""Node-local staging (simclr_core/staging.py): a copy that is byte-identical and verified, made
once per pod, resumed after an interruption, refused when the source is corrupt, shared by the
processes of one pod, from a local path and from gs://; and `simclr pretrain --stage-dir`.

The references are independent of the code under test: bytes compared with filecmp, sha256
computed here with hashlib, bytes read and written counted by the kernel (/proc/self/io) or at
the ``open`` the module calls, and datasets written here with numpy, not by ``simclr prepare``.
"""

from __future__ import annotations

import builtins
import filecmp
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from simclr_core import staging
from simclr_core.data import DatasetCorrupt, PreparedDataset
from simclr_core.staging import StagingSpaceError, stage_dataset, staged_name
from tests.conftest import REPO, TINY_PRETRAIN, run_cli
from tests.test_gcs import BUCKET, emulator  # noqa: F401  (the GCS emulator fixture)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_dataset(root: Path, images: int = 2000, side: int = 32, seed: int = 0) -> Path:
    """A prepared dataset written here with numpy: random uint8 train images (``images`` x 3 x side
    x side), labels, subsets and a manifest with every file's sha256."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(root / "train_images.npy", rng.integers(0, 256, (images, 3, side, side), dtype=np.uint8))
    np.save(root / "train_labels.npy", (np.arange(images) % 4).astype(np.int64))
    (root / "subsets.json").write_text(json.dumps({"0.5": list(range(0, images, 2))}))
    files = {name: _sha(root / name) for name in ("train_images.npy", "train_labels.npy", "subsets.json")}
    manifest = {"format_version": 1, "class_names": ["a", "b", "c", "d"], "image_shape": [3, side, side],
                "splits": {"train": {"images": images}}, "files": files}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "pvc" / "data")  # 6 MiB of images


def _io() -> dict[str, int]:
    """This process's read and write counters (bytes through read/write system calls)."""
    return {key: int(value) for key, value in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def _assert_same_tree(source: Path, copy: Path) -> None:
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in copy.iterdir()) == names  # no .part, nothing else
    for name in names:
        assert filecmp.cmp(source / name, copy / name, shallow=False), name


class _CountingOpen:
    """Counts the bytes read from files under ``root`` through the ``open`` staging calls."""

    def __init__(self, root: Path) -> None:
        self.root, self.bytes = str(root), 0

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        return _Counted(handle, self) if str(file).startswith(self.root) else handle


class _Counted:
    """A file object whose reads add to ``counter.bytes``."""

    def __init__(self, handle, counter: _CountingOpen) -> None:
        self._handle, self._counter = handle, counter

    def read(self, *args):
        block = self._handle.read(*args)
        self._counter.bytes += len(block)
        return block

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


# ------------------------------------------------------------------------------ copy, once


def test_a_staged_copy_is_byte_identical_and_opens_verified(dataset, tmp_path):
    staged = stage_dataset(dataset, tmp_path / "stage", progress=False)
    assert staged == tmp_path / "stage" / hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()[:16]
    _assert_same_tree(dataset, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    assert {name: _sha(staged / name) for name in manifest["files"]} == manifest["files"]
    assert PreparedDataset(staged, verify=True).images("train").shape == (2000, 3, 32, 32)


def test_a_second_call_reads_only_the_manifests_and_copies_nothing(dataset, tmp_path):
    staged = stage_dataset(dataset, tmp_path / "stage", progress=False)
    before_inode = (staged / "train_images.npy").stat().st_ino
    data_bytes = sum(p.stat().st_size for p in dataset.iterdir())
    start = _io()
    again = stage_dataset(dataset, tmp_path / "stage", progress=False)
    end = _io()
    assert again == staged
    manifest = (dataset / "manifest.json").stat().st_size
    assert end["rchar"] - start["rchar"] < 2 * manifest + 64 * 1024 < data_bytes // 10  # the two manifests, not 6 MiB
    assert end["wchar"] - start["wchar"] < 64 * 1024
    assert (staged / "train_images.npy").stat().st_ino == before_inode


def test_a_new_version_of_the_dataset_is_staged_beside_the_old(dataset, tmp_path):
    first = stage_dataset(dataset, tmp_path / "stage", progress=False)
    other = make_dataset(tmp_path / "v2", images=100, seed=1)
    second = stage_dataset(other, tmp_path / "stage", progress=False)
    assert second != first and second.name == staged_name((other / "manifest.json").read_bytes())
    _assert_same_tree(other, second)
    _assert_same_tree(dataset, first)


# ------------------------------------------------------------------------------ resume


def _stage_all_but_a_partial_images_file(dataset: Path, stage: Path, keep: int, corrupt: bool = False) -> Path:
    """``stage/<name>/`` as an interrupted copy leaves it: the small files in place, and the first
    ``keep`` bytes of train_images.npy in its .part (with one byte flipped when ``corrupt``)."""
    target = stage / staged_name((dataset / "manifest.json").read_bytes())
    target.mkdir(parents=True)
    for name in ("train_labels.npy", "subsets.json"):
        (target / name).write_bytes((dataset / name).read_bytes())
    head = bytearray((dataset / "train_images.npy").read_bytes()[:keep])
    if corrupt:
        head[-100] ^= 0xFF
    (target / "train_images.npy.part").write_bytes(bytes(head))
    return target


def test_a_partial_copy_is_resumed_reading_and_writing_only_the_rest(dataset, tmp_path, monkeypatch):
    size = (dataset / "train_images.npy").stat().st_size
    keep = size * 3 // 4
    target = _stage_all_but_a_partial_images_file(dataset, tmp_path / "stage", keep)
    counting = _CountingOpen(dataset)
    monkeypatch.setattr(staging, "open", counting, raising=False)
    start = _io()
    staged = stage_dataset(dataset, tmp_path / "stage", progress=False)
    written = _io()["wchar"] - start["wchar"]
    assert staged == target
    rest, manifest = size - keep, (dataset / "manifest.json").stat().st_size
    assert counting.bytes == rest  # from the source: the remainder only
    assert rest <= written <= rest + manifest + 16 * 1024  # not the 4.5 MiB kept in the .part
    _assert_same_tree(dataset, staged)


def test_a_resumed_copy_with_a_torn_tail_is_copied_again_from_the_start(dataset, tmp_path):
    size = (dataset / "train_images.npy").stat().st_size
    _stage_all_but_a_partial_images_file(dataset, tmp_path / "stage", size // 2, corrupt=True)
    staged = stage_dataset(dataset, tmp_path / "stage", progress=False)
    _assert_same_tree(dataset, staged)


def test_a_killed_copy_resumes_in_the_next_process(dataset, tmp_path):
    """A real interruption: a process copying slowly is SIGKILLed midway; the next call finishes
    the copy from the .part it left."""
    stage = tmp_path / "stage"
    copier = _staging_process(dataset, stage, slow=True)
    part = stage / staged_name((dataset / "manifest.json").read_bytes()) / "train_images.npy.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 2 * 2**20) and time.monotonic() < deadline:
        time.sleep(0.05)
    copier.kill()
    copier.wait()
    kept = part.stat().st_size
    assert 0 < kept < (dataset / "train_images.npy").stat().st_size
    start = _io()
    staged = stage_dataset(dataset, stage, progress=False)
    assert _io()["wchar"] - start["wchar"] < (dataset / "train_images.npy").stat().st_size - kept + 64 * 1024
    _assert_same_tree(dataset, staged)


# ------------------------------------------------------------------------------ corruption and space


def test_a_corrupt_source_byte_is_named_and_nothing_is_left_complete(dataset, tmp_path):
    images = dataset / "train_images.npy"
    data = bytearray(images.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: opening the source would not notice
    images.write_bytes(bytes(data))
    with pytest.raises(DatasetCorrupt, match=r"train_images\.npy does not match its sha256"):
        stage_dataset(dataset, tmp_path / "stage", progress=False)
    target = tmp_path / "stage" / staged_name((dataset / "manifest.json").read_bytes())
    assert not (target / "manifest.json").exists()
    assert not (target / "train_images.npy").exists() and not (target / "train_images.npy.part").exists()


def test_too_little_space_names_stage_dir_and_the_bytes_needed(dataset, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    needed = sum((dataset / name).stat().st_size for name in ("train_images.npy", "train_labels.npy", "subsets.json"))
    with pytest.raises(StagingSpaceError, match=rf"stage_dir {tmp_path / 'stage'} has 1000 bytes .* needs {needed} more"):
        stage_dataset(dataset, tmp_path / "stage", progress=False)


def test_a_full_disk_midway_names_stage_dir(dataset, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "_pump", full)
    with pytest.raises(StagingSpaceError, match=rf"stage_dir {tmp_path / 'stage'} has .* free, but staging"):
        stage_dataset(dataset, tmp_path / "stage", progress=False)


def test_a_source_that_is_not_a_prepared_dataset_is_refused(tmp_path):
    from simclr_core.manifest import SourceError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a prepared dataset"):
        stage_dataset(tmp_path / "empty", tmp_path / "stage", progress=False)


# ------------------------------------------------------------------------------ processes of one pod


_STAGE_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    from simclr_core import staging
    if os.environ.get("SLOW"):  # 1 MiB blocks, 100 ms each: a copy that is still running when the others start
        pump = staging._pump
        staging.BLOCK_BYTES = 2**20
        def slow(stream, out, digest, bar):
            for block in iter(lambda: stream.read(staging.BLOCK_BYTES), b""):
                out.write(block); out.flush(); digest.update(block); bar.update(len(block)); time.sleep(0.1)
        staging._pump = slow
    go = os.environ.get("GO")
    while go and not Path(go).exists():
        time.sleep(0.01)
    start = int(open("/proc/self/io").read().split()[1])
    staged = staging.stage_dataset(sys.argv[1], sys.argv[2], progress=False)
    read = int(open("/proc/self/io").read().split()[1]) - start
    print(json.dumps({"staged": str(staged), "read": read}))
""")


def _staging_process(dataset: Path, stage: Path, slow: bool = False, go: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLOW": "1" if slow else "", "GO": str(go or "")}
    return subprocess.Popen([sys.executable, "-c", _STAGE_SCRIPT, str(dataset), str(stage)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_of_one_pod_make_one_good_copy(dataset, tmp_path):
    go = tmp_path / "go"
    processes = [_staging_process(dataset, tmp_path / "stage", slow=True, go=go) for _ in range(2)]
    time.sleep(3)  # both imported and waiting (a late one would only find the copy done, and pass less)
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    staged = {result["staged"] for result, _ in results}
    assert len(staged) == 1
    size = (dataset / "train_images.npy").stat().st_size
    reads = sorted(result["read"] for result, _ in results)
    assert reads[0] < 256 * 1024 and reads[1] >= size  # one copied, the other read the manifests
    assert sum("another process of this pod is copying" in err for _, err in results) == 1  # the other waited
    _assert_same_tree(dataset, Path(staged.pop()))


# ------------------------------------------------------------------------------ gs://


def _upload(dataset: Path, uri: str) -> None:
    from simclr_core.storage import open_store

    with open_store(uri) as store:
        for path in sorted(dataset.iterdir()):
            store.write_bytes(path.name, path.read_bytes())


def test_staging_from_gcs_copies_verifies_and_names_a_corrupt_object(emulator, dataset, tmp_path):  # noqa: F811
    from simclr_core.storage import open_store

    uri = f"gs://{BUCKET}/staging/data"
    _upload(dataset, uri)
    staged = stage_dataset(uri, tmp_path / "stage", progress=False)
    _assert_same_tree(dataset, staged)
    assert stage_dataset(uri, tmp_path / "stage", progress=False) == staged

    bad = f"gs://{BUCKET}/staging/bad"
    _upload(dataset, bad)
    data = bytearray((dataset / "train_labels.npy").read_bytes())
    data[-1] ^= 0x01
    with open_store(bad) as store:
        store.write_bytes("train_labels.npy", bytes(data))
    with pytest.raises(DatasetCorrupt, match=rf"{bad}/train_labels\.npy does not match its sha256"):
        stage_dataset(bad, tmp_path / "stage2", progress=False)
    target = tmp_path / "stage2" / staged_name((dataset / "manifest.json").read_bytes())
    assert not (target / "manifest.json").exists() and not list(target.glob("*.part"))


# ------------------------------------------------------------------------------ simclr pretrain --stage-dir


def test_pretrain_with_stage_dir_trains_from_the_staged_copy(tiny_prepared, tmp_path):
    stage = tmp_path / "stage"
    result = run_cli("pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), *TINY_PRETRAIN,
                     "--epochs", "1", "--stage-dir", str(stage))
    assert result.returncode == 0, result.stderr[-3000:]
    staged = stage / staged_name((tiny_prepared / "manifest.json").read_bytes())
    _assert_same_tree(tiny_prepared, staged)
    assert f"training reads the staged copy {staged}" in result.stderr
    assert (tmp_path / "run" / "model.pt").is_file()
