"""The image-folder source: class folders listed, decoded in parallel, kept on disk.

A folder holds class subfolders (labelled) or images directly (unlabelled); with ``train/``
inside it, ``train/`` is pretrained on, ``test/`` (same classes) is the evaluations' test set,
and ``unlabeled/`` (images in any subfolders; STL-10's layout) is pretrained on too, with
label -1, which keeps it out of every evaluation and label subset.

Decoding streams (:mod:`simclr_core.data.pool`): the images go into scratch files under the
prepare's temporary directory, never into one list in memory, so a folder larger than the
machine's memory can be prepared. The split comes back as :class:`~simclr_core.data.pool.ScratchRows`,
which the writer gathers from in chunks. Every image must decode to the same size: the first
training image's, or ``prepare.image_size`` squared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simclr_core.config import PrepareConfig
from simclr_core.data.images import _FolderReader, _Group
from simclr_core.data.raw import RawSplits
from simclr_core.data.pool import ScratchRows, available_cpus, decode_all, decode_one
from simclr_core.manifest import SourceError

__all__ = ["load_image_folder"]


class _Decoded:
    """What decoding a split's groups kept: candidate indices, labels, and whether each is gray."""

    def __init__(self) -> None:
        self.keep: list[int] = []
        self.labels: list[int] = []
        self.grays: list[bool] = []


def _reference(paths: list[Path], config: PrepareConfig) -> tuple[Path | None, tuple[int, int], tuple[int, int]]:
    """(the first path that decodes, its (width, height), the (height, width) of every row).

    With ``prepare.image_size`` every row is that side; otherwise the first image that decodes
    sets the size, as a sequential read would. (None, ..., (1, 1)) when none decodes.
    """
    for path in paths:
        outcome, array = decode_one(path, config.image_size, config.max_image_pixels, None)
        if array is not None:
            return path, _width_height(array), tuple(array.shape[1:])
    return None, (0, 0), (1, 1)


def _width_height(array: np.ndarray) -> tuple[int, int]:
    """(width, height) of a (3, H, W) row."""
    return int(array.shape[2]), int(array.shape[1])


class _SplitDecoder:
    """Decodes the groups of one split into a scratch file and counts each image in order."""

    def __init__(self, reader: _FolderReader, config: PrepareConfig, hw: tuple[int, int], reference) -> None:
        self.reader, self.config, self.hw, self.reference = reader, config, hw, reference
        self.workers = config.workers or available_cpus()

    def decode(self, groups: list[_Group], scratch: Path, desc: str) -> _Decoded:
        paths = [path for group in groups for path in group.paths]
        outcomes = decode_all(paths, scratch, self.config.image_size, self.config.max_image_pixels, self.hw,
                              self.workers, desc=desc)
        decoded, index = _Decoded(), 0
        try:
            for group in groups:
                index = self._count_group(group, outcomes, index, decoded)
        finally:
            outcomes.close()  # stops the workers and closes the progress bar before an error is shown
        return decoded

    def _count_group(self, group: _Group, outcomes, index: int, decoded: _Decoded) -> int:
        """Count ``group``'s images (from ``index`` on); a class folder left without one is an error."""
        self.reader.skipped += group.skips
        before, over_before, kept_before = len(self.reader.skipped), self.reader.over_budget, len(decoded.keep)
        for path in group.paths:
            self._count(path, next(outcomes), index, group.label, decoded)
            index += 1
        if group.folder is not None and len(decoded.keep) == kept_before:
            detail = self.reader.skipped_since(before, over_before, where=" in it")
            raise SourceError(
                f"class folder {self.reader.show(group.folder)} holds no readable images{detail}; add images to it or remove it"
            )
        return index

    def _count(self, path: Path, outcome, index: int, label: int, decoded: _Decoded) -> None:
        reader = self.reader
        if outcome.kind == "over":
            reader.over_budget += 1
            reader.skip(path, outcome.reason)
            return
        if outcome.kind == "skip":
            reader.skip(path, outcome.reason)
            return
        reader.hold(path, 3 * self.hw[0] * self.hw[1])
        if outcome.kind == "size":
            first, first_size = self.reference
            raise SourceError(
                f"images differ in size: {reader.show(first)} is {first_size[0]}x{first_size[1]} but "
                f"{reader.show(path)} is {outcome.original[0]}x{outcome.original[1]} (width x height); set prepare.image_size "
                "(--image-size N) to resize and centre-crop every image to N x N"
            )
        decoded.keep.append(index)
        decoded.labels.append(label)
        decoded.grays.append(outcome.gray)


def load_image_folder(root: Path, config: PrepareConfig, scratch_dir: Path, show=str) -> RawSplits:
    """The image folder ``root`` as RawSplits whose images are :class:`ScratchRows` in ``scratch_dir``."""
    reader = _FolderReader(config, show)
    has_splits = (root / "train").is_dir()
    train_dir = root / "train" if has_splits else root
    train_groups, classes = reader.plan(train_dir, None)
    if has_splits and (root / "unlabeled").is_dir():
        train_groups.append(reader.plan_unlabeled(root / "unlabeled"))
    test_groups = reader.plan(root / "test", classes)[0] if has_splits and (root / "test").is_dir() else []
    first, first_size, hw = _reference([path for group in train_groups for path in group.paths], config)
    decoder = _SplitDecoder(reader, config, hw, (first, first_size))
    scratch_dir.mkdir(parents=True, exist_ok=True)
    train = decoder.decode(train_groups, scratch_dir / "train.u8", "decode train")
    if not train.keep:
        raise SourceError(f"image folder {show(train_dir)} holds no readable images{reader.skipped_since(0, 0) or ' (0 file(s) skipped)'}")
    # One channel when every training image is grayscale; otherwise RGB (gray images replicated).
    channels = 1 if all(train.grays) else 3
    train_x = ScratchRows(scratch_dir / "train.u8", hw, np.asarray(train.keep), channels)
    test_x = test_y = None
    if test_groups:
        test = decoder.decode(test_groups, scratch_dir / "test.u8", "decode test")
        if test.keep:
            test_x = ScratchRows(scratch_dir / "test.u8", hw, np.asarray(test.keep), channels)
            test_y = np.asarray(test.labels, dtype=np.int64)
    return RawSplits(train_x, np.asarray(train.labels, dtype=np.int64), test_x, test_y, classes, skipped=reader.skipped)
