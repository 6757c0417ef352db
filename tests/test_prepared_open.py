"""Opening a prepared dataset is O(1), and ``simclr verify`` is where every sha256 is checked.

Opening reads the manifest and the arrays' headers, whatever the dataset's size: measured as the
bytes this process reads (``rchar`` in /proc/self/io, every read() whatever the file) and the
bytes it hashes (hashlib.sha256 wrapped), never as a time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from simclr_core.cli import main
from simclr_core.config import PrepareConfig
from simclr_core.data import PreparedDataset, prepare
from simclr_core.data import sources
from simclr_core.data.sources import RawSplits, Source

OK, FAILURE, USAGE = 0, 1, 2
SMALL, LARGE = 64, 4096  # images of 3 x 32 x 32: 192 KiB and 12 MiB


def _rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")).split()[1])


class _CountingSha256:
    """hashlib.sha256, counting the bytes every digest is fed."""

    fed = 0

    def __init__(self, data: bytes = b"", **kwargs) -> None:
        self._digest = hashlib.new("sha256", **kwargs)
        self.update(data)

    def update(self, data) -> None:
        _CountingSha256.fed += memoryview(data).nbytes
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def digest(self) -> bytes:
        return self._digest.digest()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, Path]:
    """Two prepared datasets written by the real writer, from generated images: SMALL and LARGE train images."""
    root = tmp_path_factory.mktemp("open")
    made = {}
    for count in (SMALL, LARGE):
        rng = np.random.default_rng(count)
        raw = RawSplits(rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8), np.arange(count, dtype=np.int64) % 4,
                        rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8), np.arange(16, dtype=np.int64) % 4,
                        ["a", "b", "c", "d"])
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sources.SOURCES, "digits", Source(lambda config, scratch, raw=raw: raw))
            prepare(PrepareConfig(source="digits"), root / str(count))
        made[count] = root / str(count)
    return made


def _cost_of_opening(root: Path, monkeypatch, verify: bool = False) -> tuple[int, int]:
    """(bytes read, bytes hashed) by ``PreparedDataset(root, verify=verify)``."""
    monkeypatch.setattr(hashlib, "sha256", _CountingSha256)
    _CountingSha256.fed = 0
    before = _rchar()
    PreparedDataset(root, verify=True) if verify else PreparedDataset(root)  # the default, as the stages open it
    return _rchar() - before, _CountingSha256.fed


def test_opening_reads_and_hashes_no_more_for_a_larger_dataset(datasets, monkeypatch):
    PreparedDataset(datasets[SMALL])  # the first open loads the schema validator's own files
    small_read, small_hashed = _cost_of_opening(datasets[SMALL], monkeypatch)
    large_read, large_hashed = _cost_of_opening(datasets[LARGE], monkeypatch)
    assert small_hashed == large_hashed == 0
    data_bytes = (datasets[LARGE] / "train_images.npy").stat().st_size
    assert large_read < 64 * 2**10 < data_bytes, (small_read, large_read, data_bytes)
    # reading an array's header fills one 8 KiB buffer, or less for a smaller file: at most 8 KiB
    # more per array for the larger dataset, whatever its size (its data is 64 times the small one's)
    arrays = len(list(datasets[LARGE].glob("*.npy")))
    assert large_read - small_read <= arrays * 8 * 2**10, (small_read, large_read)


def test_verify_true_still_hashes_everything(datasets, monkeypatch):
    """What the test above would catch: the hashing open reads and hashes every byte."""
    read, hashed = _cost_of_opening(datasets[LARGE], monkeypatch, verify=True)
    total = sum(path.stat().st_size for path in datasets[LARGE].iterdir() if path.name != "manifest.json")
    assert hashed == total and read >= total


def _verify(root, caplog, capsys) -> tuple[int, str]:
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    try:
        code = main(["verify", str(root)])
    except SystemExit as exit:
        code = int(exit.code)
    return code, capsys.readouterr().err + caplog.text


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x01]))


def test_simclr_verify_names_the_file_with_a_corrupted_byte(datasets, tmp_path, caplog, capsys):
    copy = tmp_path / "data"
    shutil.copytree(datasets[SMALL], copy)
    assert _verify(copy, caplog, capsys)[0] == OK
    images = copy / "train_images.npy"
    _flip_byte(images, images.stat().st_size // 2)  # in the data, same size: opening cannot see it
    PreparedDataset(copy)
    code, output = _verify(copy, caplog, capsys)
    assert code == FAILURE, output
    assert f"simclr verify: failed: {images} does not match its sha256" in output
    (copy / "subsets.json").unlink()
    _flip_byte(images, images.stat().st_size // 2)  # restored: now the missing file is the first problem
    code, output = _verify(copy, caplog, capsys)
    assert code == FAILURE and "subsets.json is listed in" in output and "but missing" in output, output


@pytest.mark.parametrize("what", ["missing", "a file", "not a dataset"])
def test_simclr_verify_of_something_that_is_not_a_dataset_is_a_usage_error(what, tmp_path, caplog, capsys):
    target = tmp_path / "target"
    if what == "a file":
        target.write_text("x")
    elif what == "not a dataset":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    code, output = _verify(target, caplog, capsys)
    assert code == USAGE and f"simclr verify: error: {target} is not a prepared dataset" in output, output


def test_the_pipeline_copy_on_the_volume_is_verified(datasets, tmp_path, monkeypatch):
    from components.common import copy_tree
    from components.launcher import LaunchError, stage_on_volume
    from components.launcher import volume as volume_module

    def corrupting_copy(source, destination):
        copy_tree(source, destination)
        _flip_byte(Path(destination) / "test_images.npy", 200)

    monkeypatch.setattr(volume_module, "copy_tree", corrupting_copy)
    volume = tmp_path / "volume"
    volume.mkdir()
    with pytest.raises(LaunchError, match="test_images.npy does not match its sha256"):
        stage_on_volume(str(datasets[SMALL]), "simclr-data", str(volume), "run-a", log=lambda line: None)
    run = volume / "pipeline-runs" / "run-a"
    assert not (run / "data").exists() and not (run / "data.partial").exists()  # a retried step copies again
