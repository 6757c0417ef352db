"""Decoding images in parallel into a scratch file, in bounded memory.

``prepare`` decodes an image folder with a pool of worker processes (``prepare.workers``).
Each task is a run of consecutive images: the worker decodes them and writes their rows
straight into a scratch file (raw uint8, one row of 3 x H x W bytes per image, at the image's
index) with ``pwrite``, and sends back only what became of each image (:class:`Outcome`). The
parent takes the outcomes in order, so skipped files are listed, budgets counted and errors
raised exactly as a sequential read would. At most two tasks per worker are in flight, so
memory stays about two runs of rows per worker whatever the dataset's size.

:class:`ScratchRows` reads the decoded rows back, those that decoded only, as an array-like
that the writer gathers from in chunks (``rows[index]``), without mapping the file: the pages
read are not kept in this process.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from simclr_core.data.images import _decode_image, _luminance, _OverBudget
from simclr_core.data.rows import read_rows

__all__ = ["Outcome", "decode_one", "decode_all", "ScratchRows", "available_cpus", "RUN_BYTES"]

RUN_BYTES = 8 * 2**20  # rows decoded per task, at most (and at least one image)
MAX_RUN = 256  # images per task, at most: small images would otherwise make one task of the whole folder


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one image: ``kind`` is "ok", "skip" (``reason``), "over" (over the pixel
    budget; ``reason``) or "size" (decoded, but not the reference's size: ``original`` is its
    (width, height))."""

    kind: str
    gray: bool = False
    reason: str = ""
    original: tuple[int, int] = (0, 0)


def decode_one(path: Path, size: int, max_pixels: int, hw: tuple[int, int] | None) -> tuple[Outcome, np.ndarray | None]:
    """The outcome of decoding ``path``, and its RGB uint8 (3, H, W) row when it is "ok".

    ``hw`` is the (height, width) every row must have (None: any, for finding the first one).
    """
    try:
        array, original, gray = _decode_image(path, size, max_pixels)
    except _OverBudget as error:
        return Outcome("over", reason=str(error)), None
    except Exception as error:  # PIL raises many types for bad files
        return Outcome("skip", reason=f"{type(error).__name__}: {error}"), None
    if hw is not None and tuple(array.shape[1:]) != tuple(hw):
        return Outcome("size", original=original), None
    return Outcome("ok", gray=gray), array


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _decode_run(scratch: str, first: int, paths: Sequence[Path], size: int, max_pixels: int, hw: tuple[int, int]) -> list[Outcome]:
    """Decode ``paths`` (images ``first``, ``first + 1``, ...) into their rows of ``scratch``."""
    rows = np.zeros((len(paths), 3, *hw), dtype=np.uint8)  # a skipped image's row stays zeros, never read
    outcomes = []
    for index, path in enumerate(paths):
        outcome, array = decode_one(path, size, max_pixels, hw)
        if array is not None:
            rows[index] = array
        outcomes.append(outcome)
    fd = os.open(scratch, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        _pwrite_all(fd, memoryview(rows).cast("B"), first * rows[0].nbytes)
    finally:
        os.close(fd)
    return outcomes


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, within a cgroup v2 CPU quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)


def decode_all(paths: Sequence[Path], scratch: Path, size: int, max_pixels: int, hw: tuple[int, int], workers: int,
               desc: str = "decode", progress: bool = True) -> Iterator[Outcome]:
    """The outcome of every path, in order, their rows written into ``scratch`` (created here,
    ``len(paths)`` rows of 3 x H x W bytes). ``workers`` <= 1 decodes in this process."""
    row_bytes = 3 * hw[0] * hw[1]
    with open(scratch, "wb") as handle:
        handle.truncate(len(paths) * row_bytes)  # sparse until written
    run = max(1, min(MAX_RUN, RUN_BYTES // row_bytes))
    tasks = ((str(scratch), first, paths[first : first + run], size, max_pixels, hw) for first in range(0, len(paths), run))
    with _progress(len(paths), desc, progress) as bar:
        for outcomes in _run_tasks(tasks, workers):
            bar.update(len(outcomes))
            yield from outcomes


def _run_tasks(tasks, workers: int) -> Iterator[list[Outcome]]:
    """Each task's outcomes, in the tasks' order: here, or on ``workers`` processes with at most
    two tasks each in flight (bounded memory; the rest are not yet submitted)."""
    if workers <= 1:
        yield from (_decode_run(*task) for task in tasks)
        return
    from concurrent.futures import ProcessPoolExecutor

    # forkserver: the workers start from a clean process, not a fork of one that may hold torch's threads
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    pending: collections.deque = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_decode_run, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ScratchRows:
    """The rows of a scratch file that decoded, as an array-like of shape (N, channels, H, W).

    ``rows[index]`` (an int array, ascending for speed) reads those rows with ``preadv`` into a
    new uint8 array: RGB as decoded, or one channel (PIL's luminance, which leaves a gray
    image's value as it is) when ``channels`` is 1.
    """

    def __init__(self, path: Path, hw: tuple[int, int], keep: np.ndarray, channels: int) -> None:
        self.path, self.keep, self.channels = Path(path), np.asarray(keep, dtype=np.int64), channels
        self.shape = (len(self.keep), channels, *hw)
        self.nbytes = math.prod(self.shape)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        rows = self.keep[np.asarray(index, dtype=np.int64)]
        out = np.empty((len(rows), 3, *self.shape[2:]), dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            read_rows(fd, out, rows, 0, self.path)  # runs of consecutive rows: one read each
        finally:
            os.close(fd)
        return out if self.channels == 3 else _luminance(out)
