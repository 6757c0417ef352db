"""Reading chosen rows of a uint8 array file with ``preadv``: the bytes asked for, several at once.

Pretraining reads each step's images at random rows of the training split. Through the memory
map, every page fault also reads ahead around it: for 196 KB images (256 px) the disk delivered
more than twice the bytes the batch needed, one fault at a time. :class:`RowReader` reads each
run of consecutive rows with one ``preadv`` into the batch's own array, on a file descriptor
advised ``POSIX_FADV_RANDOM`` (no read-ahead), and reads the runs on a few threads at once, so
a disk or a network volume has several requests in flight (``preadv`` releases the GIL).
benchmarks/bench_data.py measures it against the memory map.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["RowReader", "read_rows", "READ_THREADS"]

READ_THREADS = 8  # requests in flight: enough to keep a local SSD or a network volume busy


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    while buffer:
        got = os.preadv(fd, [buffer], offset)
        if got == 0:
            raise OSError(f"{path} ended at byte {offset}, before the rows asked for: the file was truncated")
        buffer, offset = buffer[got:], offset + got


def read_rows(fd: int, out: np.ndarray, rows: np.ndarray, offset: int, path: Path, pool: ThreadPoolExecutor | None = None) -> None:
    """Rows ``rows`` (int64 (n,), any order) of the file ``fd`` into ``out`` (uint8 (n, ...), C order):
    row r of the file starts at ``offset + r * row_bytes``. Each run of consecutive rows is one
    read; on ``pool``, the runs are read concurrently."""
    if not len(rows):
        return
    row_bytes = out[0].nbytes
    flat = memoryview(out).cast("B")
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = list(zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]))

    def read(run: tuple[int, int]) -> None:
        start, stop = run
        _pread_into(fd, flat[start * row_bytes : stop * row_bytes], offset + int(rows[start]) * row_bytes, path)

    if pool is None or len(runs) < 2:
        for run in runs:
            read(run)
    else:
        list(pool.map(read, runs))


class RowReader:
    """``reader(index)``: the rows ``index`` (int array) of an ``.npy`` array of uint8 (N, ...), as
    a new array, read with :func:`read_rows` on ``threads`` threads. Close it (or use it as a
    context manager) to release its file descriptor and threads."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], offset: int, threads: int = READ_THREADS) -> None:
        self.path, self.shape, self.offset = Path(path), tuple(shape), offset
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="simclr-rows") if threads > 1 else None

    def __call__(self, index: np.ndarray) -> np.ndarray:
        rows = np.asarray(index, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of {self.path}, which has {self.shape[0]}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        read_rows(self.fd, out, rows, self.offset, self.path, self.pool)
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
