"""What a source gives the writer: :class:`RawSplits`, its images and labels before the val split."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["RawSplits"]


@dataclasses.dataclass
class RawSplits:
    """Images of a source before the val split and subsets: uint8 (N, C, H, W) and int64 (N,).

    The images are arrays, or array-likes read from disk (:class:`~simclr_core.data.pool.ScratchRows`):
    each has ``shape``, ``nbytes``, ``len()`` and ``images[index]`` for an int array ``index``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    extra: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    skipped: list[dict] = dataclasses.field(default_factory=list)
