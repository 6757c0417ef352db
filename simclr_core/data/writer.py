"""The writer: :func:`prepare` turns a source into a prepared dataset directory, atomically.

The source is read by :func:`~simclr_core.data.sources.load_source` (image folders decoded in
parallel into scratch files); a val split is held out of its training images (seeded), the
class-balanced label subsets are drawn (:func:`class_balanced_subset`), each split's images are
gathered and written in chunks (bounded memory), and every file is written into a temporary directory beside
the destination, fsynced and renamed into place (:func:`_commit`): a failed or interrupted
prepare never leaves a half-written dataset, and a dataset already there is replaced only by a
complete new one. The manifest records the sha256 of every file prepare wrote, hashed as it was written.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from simclr_core import __version__
from simclr_core.config import PrepareConfig
from simclr_core.data.prepared import FORMAT_VERSION
from simclr_core.data.sources import RawSplits, load_source, source_root
from simclr_core.manifest import SourceError
from simclr_core.storage import sha256_file

__all__ = ["prepare", "class_balanced_subset"]

CHUNK_BYTES = 8 * 2**20  # images gathered and written at a time


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``fraction`` of each class's examples (at least one per class).

    Deterministic: the same labels, fraction and seed give the same subset on any machine.
    """
    rng = np.random.default_rng([seed, round(fraction * 1e6)])
    chosen = []
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        take = max(1, round(fraction * len(members)))
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


Split = tuple  # (images: an array or array-like, index: int64 (n,) into it, labels: int64 (n,))


def _split_val(raw: RawSplits, config: PrepareConfig) -> dict[str, Split]:
    """Each split as (the source's images, the rows it takes, their labels): nothing is copied yet."""
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(raw.train_images))
    n_val = round(config.val_fraction * len(order))
    val_index, train_index = order[:n_val], order[n_val:]
    if config.max_train:
        train_index = train_index[: config.max_train]
    val_index, train_index = np.sort(val_index), np.sort(train_index)
    splits = {
        "train": (raw.train_images, train_index, raw.train_labels[train_index]),
        "val": (raw.train_images, val_index, raw.train_labels[val_index]),
    }
    if raw.test_images is not None:
        splits["test"] = (raw.test_images, np.arange(len(raw.test_images)), raw.test_labels)
    for name, (images, labels) in raw.extra.items():
        splits[name] = (images, np.arange(len(images)), labels)
    return splits


def _check_dataset_size(raw: RawSplits, config: PrepareConfig) -> None:
    """The source's images (N x C x H x W bytes, all splits) within prepare.max_dataset_mib, before
    they are written. Image folders and IDX files are checked while read; this covers the rest."""
    arrays = [raw.train_images, raw.test_images, *(images for images, _ in raw.extra.values())]
    total = sum(array.nbytes for array in arrays if array is not None)
    if total > config.max_dataset_mib * 2**20:
        raise SourceError(
            f"{config.source}: the images take {total / 2**20:.0f} MiB (N x C x H x W bytes, all splits), over "
            f"prepare.max_dataset_mib ({config.max_dataset_mib}); raise it if the source is genuine and the disk has room"
        )


class _HashingFile:
    """A binary file that hashes (sha256) what is written to it."""

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _write_images(path: Path, images, index: np.ndarray) -> str:
    """``images[index]`` as the uint8 ``.npy`` file ``path`` (the bytes ``np.save`` writes), gathered
    in chunks of about :data:`CHUNK_BYTES`; returns its sha256, computed as it is written."""
    row_shape = tuple(images.shape[1:])
    per_chunk = max(1, CHUNK_BYTES // max(1, math.prod(row_shape)))
    with open(path, "wb") as handle:
        out = _HashingFile(handle)
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (len(index), *row_shape)}
        np.lib.format.write_array_header_1_0(out, header)
        for start in range(0, len(index), per_chunk):
            out.write(memoryview(np.ascontiguousarray(images[index[start : start + per_chunk]], dtype=np.uint8)).cast("B"))
    return out.digest.hexdigest()


def _write_labels(path: Path, labels: np.ndarray) -> str:
    with open(path, "wb") as handle:
        out = _HashingFile(handle)
        np.save(out, labels.astype(np.int64))
    return out.digest.hexdigest()


def _check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be absent, an empty directory, or a prepared dataset (which is replaced)."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SourceError(f"--out {out_dir} exists and is not a directory; refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise SourceError(
            f"--out {out_dir} is a non-empty directory that is not a prepared dataset (no manifest.json); "
            "refusing to replace it: choose another --out or empty it"
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Put the finished ``tmp`` in place of ``out_dir``: the old dataset goes only once the new one is there."""
    for path in tmp.iterdir():
        _fsync(path)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent)) / "data"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
            shutil.rmtree(old.parent, ignore_errors=True)
        raise
    _fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _clean_leftovers(out_dir: Path) -> None:
    """Remove what a prepare killed half-way left beside ``out_dir`` (restoring a dataset moved aside)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out_dir.parent.glob(f".{out_dir.name}.old-*"):
        if not out_dir.exists() and (old / "data" / "manifest.json").is_file():
            os.replace(old / "data", out_dir)  # killed between the two renames of _commit
        shutil.rmtree(old, ignore_errors=True)


def _write_splits(tmp: Path, splits: dict[str, Split], class_names: list[str]) -> tuple[dict, dict]:
    """Every split's images and labels into ``tmp``: (counts per split, sha256 per file)."""
    counts, files = {}, {}
    for split, (images, index, labels) in splits.items():
        files[f"{split}_images.npy"] = _write_images(tmp / f"{split}_images.npy", images, index)
        files[f"{split}_labels.npy"] = _write_labels(tmp / f"{split}_labels.npy", labels)
        per_class = {class_names[c]: int((labels == c).sum()) for c in range(len(class_names))}
        counts[split] = {"images": int(len(index)), "per_class": per_class, "unlabeled": int((labels < 0).sum())}
    return counts, files


def _manifest(config: PrepareConfig, raw: RawSplits, counts: dict, subsets: dict, files: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": config.source,
        "source_root": source_root(config),
        "config": dataclasses.asdict(config),
        "image_shape": list(raw.train_images.shape[1:]),
        "class_names": raw.class_names,
        "splits": counts,
        "label_subsets": {k: len(v) for k, v in subsets.items()},
        "skipped": raw.skipped,
        "simclr_core_version": __version__,
        "files": dict(sorted(files.items())),
    }


def _no_space(error: BaseException, out_dir: Path) -> BaseException:
    """A disk-full OSError reworded to say that nothing was written; other errors as they are."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(
            error.errno,
            f"{os.strerror(error.errno)} while writing the prepared dataset {out_dir}; nothing was written "
            "(a dataset already there is untouched): free some space and rerun",
        )
    return error


def prepare(config: PrepareConfig, out_dir: str | Path) -> dict:
    """Write the prepared dataset of ``config`` to ``out_dir`` (atomically); return its manifest.

    The dataset is written into a temporary sibling directory, fsynced and renamed into place:
    on any failure nothing is left behind, and a prepared dataset already at ``out_dir`` stays
    as it was. ``out_dir`` must be absent, empty, or a prepared dataset. Image folders are
    decoded into scratch files in that directory (``prepare.workers`` processes) and written
    out in chunks, so memory stays bounded whatever the dataset's size; the disk needs about
    twice the dataset's size while it runs.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        raw = load_source(config, tmp / ".scratch")
        _check_dataset_size(raw, config)
        splits = _split_val(raw, config)
        if len(splits["train"][1]) == 0:
            raise SourceError(f"{config.source}: no training images left after the val split")
        counts, files = _write_splits(tmp, splits, raw.class_names)
        shutil.rmtree(tmp / ".scratch", ignore_errors=True)
        train_labels = splits["train"][2]
        subsets = {str(f): class_balanced_subset(train_labels, f, config.seed).tolist() for f in config.label_fractions}
        (tmp / "subsets.json").write_text(json.dumps(subsets))
        files["subsets.json"] = sha256_file(tmp / "subsets.json")
        manifest = _manifest(config, raw, counts, subsets, files)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private
        _commit(tmp, out_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        reworded = _no_space(error, out_dir)
        if reworded is not error:
            raise reworded from error
        raise
    return manifest
