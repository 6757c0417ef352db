"""Streaming, parallel prepare of image folders (simclr_core.data.pool, folder, writer).

The references are independent of the streaming machinery: each file decoded on its own by
``_decode_image`` (the one-image unit), the rows stacked in a list and split with the seeded
permutation, as the writer did before it streamed; and a memory cap (RLIMIT_DATA) far below
the dataset's size, under which a list-and-stack prepare cannot run.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_core.config import PrepareConfig
from simclr_core.data import PreparedDataset, prepare
from simclr_core.data.images import IMAGE_SUFFIXES, _decode_image
from simclr_core.data.pool import ScratchRows, available_cpus

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog")


def _write_folder(root: Path, per_class: int, seed: int = 0, gray_only: bool = False) -> None:
    """train/ and test/ of CLASSES: PNG, JPEG and BMP files of mixed sizes and modes, plus a
    truncated PNG, a file that is no image and a text file in every class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", max(2, per_class // 5))):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (int(rng.integers(10, 40)), int(rng.integers(10, 40)), 3), dtype=np.uint8)
                image = Image.fromarray(pixels[..., 0] if gray_only or index % 4 == 2 else pixels)
                image.save(folder / f"{index:05d}.{('png', 'jpg', 'png', 'bmp')[index % 4]}")
            (folder / "notes.txt").write_text("not an image")
            (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
            whole = (folder / "00000.png").read_bytes()
            (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])


def _list_and_stack(root: Path, split: str, size: int, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every decodable image of ``split`` decoded alone, kept in a list, stacked."""
    rows, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                rows.append(_decode_image(path, size, 50_000_000)[0])
                labels.append(label)
            except Exception:
                continue
    return np.stack(rows), np.asarray(labels)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streaming") / "images"
    _write_folder(root, per_class=500)  # 2,000 training images
    return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory) -> dict[int, Path]:
    """The folder prepared with 1 worker (in this process) and with 2 worker processes."""
    out = tmp_path_factory.mktemp("prepared")
    for workers in (1, 2):
        prepare(PrepareConfig(source="imagefolder", source_root=str(folder), image_size=20, workers=workers), out / str(workers))
    return {workers: out / str(workers) for workers in (1, 2)}


def test_streamed_arrays_equal_the_list_and_stack_reference(folder, prepared):
    dataset = PreparedDataset(prepared[2])
    train, labels = _list_and_stack(folder, "train", 20, list(CLASSES))
    rgb = np.any(train[:, 0] != train[:, 1])
    assert rgb and dataset.image_shape == (3, 20, 20)
    order = np.random.default_rng(0).permutation(len(train))  # the writer's seeded val split (prepare.seed 0)
    n_val = round(0.05 * len(train))
    val_index, train_index = np.sort(order[:n_val]), np.sort(order[n_val:])
    assert len(train) == 2000 and dataset.manifest["splits"]["train"]["images"] == len(train_index)
    np.testing.assert_array_equal(dataset.images("train"), train[train_index])
    np.testing.assert_array_equal(dataset.labels("train"), labels[train_index])
    np.testing.assert_array_equal(dataset.images("val"), train[val_index])
    test, test_labels = _list_and_stack(folder, "test", 20, list(CLASSES))
    np.testing.assert_array_equal(dataset.images("test"), test)
    np.testing.assert_array_equal(dataset.labels("test"), test_labels)


def test_one_worker_and_a_pool_write_the_same_files(prepared):
    one, pool = (json.loads((prepared[w] / "manifest.json").read_text()) for w in (1, 2))
    assert one["files"] == pool["files"]  # sha256 of every array
    assert one["skipped"] == pool["skipped"]  # the same files skipped, listed in the same order
    assert len(one["skipped"]) == 3 * 2 * len(CLASSES)  # text, broken, truncated: in train and test of each class
    assert "<_io." not in json.dumps(one["skipped"])  # a reason names the problem, not a file descriptor


def test_a_gray_folder_is_stored_with_one_channel_as_before(tmp_path):
    _write_folder(tmp_path / "gray", per_class=20, gray_only=True)
    prepare(PrepareConfig(source="imagefolder", source_root=str(tmp_path / "gray"), image_size=12, workers=2), tmp_path / "out")
    dataset = PreparedDataset(tmp_path / "out")
    train, _ = _list_and_stack(tmp_path / "gray", "train", 12, list(CLASSES))
    order = np.random.default_rng(0).permutation(len(train))
    assert dataset.image_shape == (1, 12, 12)
    np.testing.assert_array_equal(dataset.images("train"), train[np.sort(order[round(0.05 * len(train)) :]), :1])


def test_scratch_rows_read_runs_and_convert_to_luminance(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 5), dtype=np.uint8)
    (tmp_path / "s.u8").write_bytes(rows.tobytes())
    keep = np.array([0, 1, 2, 5, 6, 9])  # candidates 3, 4, 7, 8 did not decode
    np.testing.assert_array_equal(ScratchRows(tmp_path / "s.u8", (4, 5), keep, 3)[np.array([0, 2, 3, 5])], rows[[0, 2, 5, 9]])
    gray = ScratchRows(tmp_path / "s.u8", (4, 5), keep, 1)[np.array([4])]
    expected = np.asarray(Image.fromarray(rows[6].transpose(1, 2, 0)).convert("L"))  # PIL's own RGB -> L
    np.testing.assert_array_equal(gray[0, 0], expected)


def test_workers_default_to_the_cpus_this_process_may_use():
    import os

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


# The child: import what prepare needs, cap the data segment (heap and private mappings, not
# the files prepare writes) at what that took + CAP, run the CLI; report its peak RSS.
CAP = 64 * 2**20
CHILD = f"""
import re, resource, sys
import PIL.Image, PIL.PngImagePlugin, PIL.JpegImagePlugin, PIL.BmpImagePlugin
import simclr_core.cli, simclr_core.data, simclr_core.errors, simclr_core.runlock, simclr_core.storage
status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + {CAP}, resource.getrlimit(resource.RLIMIT_DATA)[1]))
base = status("VmRSS")
code = simclr_core.cli.main(sys.argv[1:])
import multiprocessing.forkserver
multiprocessing.forkserver._forkserver._stop()  # its workers' rusage reaches this process once it has exited
growth, workers = status("VmHWM") - base, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print("peak rss", growth, workers, "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.timeout(300)
def test_a_dataset_several_times_the_memory_cap_is_prepared(tmp_path):
    """8,000 small files stored at 96 px: 221 MB of rows (3.3x the cap above the imports), prepared
    under RLIMIT_DATA; a list of the decoded rows alone would not fit."""
    root = tmp_path / "big"
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (root / "train" / name).mkdir(parents=True)
        for index in range(2000):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "train" / name / f"{index:05d}.png")
    rows_bytes = 8000 * 3 * 96 * 96
    assert rows_bytes > 3 * CAP
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "prepare", "--source", "imagefolder", "--source-root", str(root), "--image-size", "96",
         "--workers", "2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = PreparedDataset(tmp_path / "out", verify=True)
    assert len(dataset.images("train")) + len(dataset.images("val")) == 8000
    assert re.search(r"decode train: 100%.*8000/8000", result.stderr), result.stderr[-2000:]  # the bar counts images
    # the CLI's peak RSS above what its imports took, and its largest worker's peak RSS (or its own at
    # a fork: a child's high-water mark starts at its parent's size, and prepare never loads torch)
    own, workers, torch_loaded = re.search(r"peak rss (-?\d+) (\d+) (\w+)", result.stderr).groups()
    own, workers = int(own), int(workers)
    assert torch_loaded == "False"
    print(f"peak RSS: prepare +{own / 2**20:.0f} MiB, largest worker {workers / 2**20:.0f} MiB, rows {rows_bytes / 2**20:.0f} MiB")
    assert max(own, workers) < rows_bytes / 2
    assert not list(tmp_path.glob(".out.tmp-*"))  # the scratch files went with the temporary directory
