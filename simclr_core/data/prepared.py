"""The reader: :class:`PreparedDataset`, read access to a prepared dataset directory.

A prepared dataset is a directory::

    manifest.json             format_version, source, counts per split and class, class names,
                              image shape, sha256 of every file, skipped files, simclr_core version
    {split}_images.npy        uint8 (N, C, H, W), memory-mappable; split in train, val, test
                              (STL-10's and an image folder's unlabeled/ images are in
                              train and val, with label -1)
    {split}_labels.npy        int64 (N,), -1 where unlabelled
    subsets.json              {"0.01": [train indices], "0.1": [...]}: class-balanced label
                              subsets, fixed by the seed (numpy PCG64: same on any machine)

Opening one is O(1): :class:`PreparedDataset` checks the format version, the manifest's
schema, and each array's header (dtype, shape) and file size (:mod:`simclr_core.manifest`),
reading a few kilobytes whatever the dataset's size; it does not hash the data. Every rank of
every stage opens the dataset, and at ImageNet scale (193 GB at 224 px) hashing it would take
minutes per open. A truncated or padded array, a missing file, a wrong dtype or shape, or an
edited manifest is still refused at open, with a message naming the file.

The sha256 sums in the manifest are checked where integrity matters, in full
(:meth:`PreparedDataset.verify`, a :class:`DatasetCorrupt` naming the first file that differs):

- ``simclr verify DIR``, explicitly (exit 0 when every sum matches, 1 naming the first
  corrupt file, 2 when DIR is not a prepared dataset);
- where a dataset is copied: a stage whose ``--data`` is a gs:// or s3:// URI verifies the
  download once, and the pipeline's pretrain step verifies its copy on the PVC;
- by callers that ask for it: ``PreparedDataset(root, verify=True)``.

``prepare`` writes the sums (hashing the files it has just written) and does not verify them
again; a byte flipped in place, without changing a file's size, is found by ``simclr verify``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simclr_core import __version__
from simclr_core.config import ConfigError, shown
from simclr_core.data.rows import READ_THREADS, RowReader
from simclr_core.manifest import SourceError, check_array, check_labels, check_manifest, read_manifest, read_subsets
from simclr_core.storage import sha256_file

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT_VERSION", "DatasetCorrupt", "PreparedDataset"]

LARGE_ROW_BYTES = 16 * 2**10  # images from 74 x 74 RGB up are read with preadv (see batch_reader)
FORMAT_VERSION = 1  # of the prepared dataset layout; PreparedDataset refuses other versions


class DatasetCorrupt(SourceError):
    """A file of a prepared dataset is missing or does not match its sha256; the message names it."""


class PreparedDataset:
    """Read access to a prepared dataset directory (images memory-mapped).

    Opening one checks it without reading the data (:mod:`simclr_core.manifest`): the
    manifest's ``format_version`` must be :data:`FORMAT_VERSION` (a manifest without the field
    predates it and has the same layout), the manifest must match its schema, and every
    split's arrays must have the dtype and shape it gives, and the file size that implies. The
    data is not read or hashed (opening is O(1)); with ``verify``, every file the manifest lists
    must also match its sha256 (:meth:`verify`, reading everything). Failures are SourceErrors that name the file
    and say to run ``simclr prepare`` again.
    """

    def __init__(self, root: str | Path, verify: bool = False) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        version = manifest.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SourceError(
                f"{self.root} is a prepared dataset of format version {shown(version, 20)}, but this simclr_core ({__version__}) "
                f"reads version {FORMAT_VERSION}; run `simclr prepare` again to rewrite it"
            )
        check_manifest(self.root, manifest)
        self.manifest = manifest
        self.class_names: list[str] = manifest["class_names"]
        self.image_shape: tuple[int, int, int] = tuple(manifest["image_shape"])
        for split, counts in manifest["splits"].items():
            check_array(self.root / f"{split}_images.npy", np.dtype(np.uint8), (counts["images"], *self.image_shape))
            check_array(self.root / f"{split}_labels.npy", np.dtype(np.int64), (counts["images"],))
        if verify:
            self.verify()

    def verify(self) -> int:
        """Check that every file the manifest lists is there and matches its sha256; the bytes hashed.

        A :class:`DatasetCorrupt` (a SourceError) naming the first file, in name order, that is
        missing or differs."""
        manifest_path, hashed = self.root / "manifest.json", 0
        for name, expected in sorted(self.manifest["files"].items()):
            path = self.root / name
            if not path.is_file():
                raise DatasetCorrupt(
                    f"{path} is listed in {manifest_path} but missing: the dataset is incomplete; run `simclr prepare` again"
                )
            actual = sha256_file(path)
            if actual != expected:
                raise DatasetCorrupt(
                    f"{path} does not match its sha256 in {manifest_path} (expected {str(expected)[:12]}..., found "
                    f"{actual[:12]}...): it was changed or corrupted after prepare; run `simclr prepare` again"
                )
            hashed += path.stat().st_size
        return hashed

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def _split_file(self, split: str, kind: str) -> Path:
        if split not in self.manifest["splits"]:
            remedy = _MISSING_SPLIT_REMEDY.get(split, "run `simclr prepare` with a source that has it")
            raise SourceError(f"{self.root} has no '{split}' split; {remedy}")
        return self.root / f"{split}_{kind}.npy"

    def images(self, split: str) -> np.ndarray:
        """uint8 (N, C, H, W), memory-mapped."""
        return np.load(self._split_file(split, "images"), mmap_mode="r", allow_pickle=False)

    def batch_reader(self, split: str, threads: int = READ_THREADS) -> "RowReader | _MappedRows":
        """A reader of ``split``'s images at chosen rows, for reading at random (a training step's
        batch): ``reader(index)`` is uint8 (len(index), C, H, W); close it when done.

        Rows of :data:`LARGE_ROW_BYTES` or more are read with ``preadv`` (:class:`RowReader`: the
        bytes asked for, several requests in flight); smaller ones are gathered from the memory
        map, where a dataset of small images sits in the page cache and one call per row would
        cost more than the map's copy.
        """
        images = self.images(split)
        if math.prod(images.shape[1:]) < LARGE_ROW_BYTES:
            return _MappedRows(images)
        return RowReader(self._split_file(split, "images"), images.shape, images.offset, threads)

    def labels(self, split: str) -> np.ndarray:
        """int64 (N,): a class index, or -1 for an unlabelled image."""
        path = self._split_file(split, "labels")
        labels = np.load(path, allow_pickle=False)
        check_labels(path, labels, self.num_classes)
        return labels

    def subset(self, fraction: float) -> np.ndarray:
        """Training indices of the class-balanced ``fraction`` label subset."""
        subsets = read_subsets(self.root / "subsets.json", self.labels("train"))
        key = next((k for k in subsets if abs(float(k) - fraction) < 1e-9), None)
        if key is None:
            raise ConfigError(f"label fraction {fraction} was not prepared; {self.root} has {sorted(subsets)}")
        return subsets[key]

    def tensor(self, split: str, index: np.ndarray | None = None) -> "torch.Tensor":
        """uint8 (N, C, H, W) tensor of ``split`` (rows ``index`` if given)."""
        images = self.images(split)
        array = images[index] if index is not None else np.asarray(images)
        import torch  # here, not at the top: prepare and its decoding workers never need torch

        return torch.from_numpy(np.ascontiguousarray(array))


class _MappedRows:
    """:meth:`PreparedDataset.batch_reader` for small rows: gathers from the memory map."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[index])

    def close(self) -> None:
        pass


_MISSING_SPLIT_REMEDY = {
    "test": "every evaluation scores the encoder on the test split: give the image folder a test/ folder "
    "(class subfolders, as in train/) and run `simclr prepare` again",
    "val": "run `simclr prepare` again with prepare.val_fraction > 0",
}
