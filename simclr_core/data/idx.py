"""IDX files (MNIST's and Fashion-MNIST's format), gzipped or not, read within a budget.

Only the header is trusted to size anything, and only after it is checked against
``prepare.max_dataset_mib``: a small .gz that inflates to gigabytes, or a header claiming more
values than the file holds, cannot make prepare read or allocate them.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from simclr_core.data.images import _open_regular
from simclr_core.manifest import SourceError


IDX_UNSIGNED_BYTE = 0x08
_READ_CHUNK = 1 << 20


@contextlib.contextmanager
def _idx_stream(path: Path):
    """The decompressed bytes of the IDX file ``path`` (gzipped when it ends in .gz), as a stream."""
    with _open_regular(path) as raw:
        if path.suffix != ".gz":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            yield stream


def _idx_shape(stream, path: Path) -> tuple[int, ...]:
    """The dimensions in the IDX header at the start of ``stream`` (which is left just past it)."""
    head = stream.read(4)
    if len(head) < 4:
        raise SourceError(f"{path} is not an IDX file: it is shorter than the 4-byte IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or dtype_code != IDX_UNSIGNED_BYTE or not 1 <= ndim <= 4:
        raise SourceError(f"{path} is not an IDX file of unsigned bytes (its header starts {head.hex()})")
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise SourceError(f"{path} is truncated inside its IDX header")
    return struct.unpack(f">{ndim}I", dims)


def _idx_header(path: Path) -> tuple[int, ...]:
    """The dimensions the IDX file ``path`` claims, reading only its header."""
    with _idx_errors(path), _idx_stream(path) as stream:
        return _idx_shape(stream, path)


@contextlib.contextmanager
def _idx_errors(path: Path):
    """gzip's and the file system's errors as SourceErrors naming ``path``."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError; a cut .gz is an EOFError
        raise SourceError(f"{path} cannot be read ({type(error).__name__}: {error}); is it complete?") from None


def _read_at_most(stream, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, read in chunks: memory follows what is there, not a claim."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(_READ_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _read_idx(path: Path, max_bytes: int) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, read no further than its header claims.

    The header's claim (count x dims bytes) must be within ``max_bytes`` before any data is
    read, and at most that many bytes + 1 are read: a small .gz that inflates to gigabytes, or a
    header claiming more images than the file holds, cannot make prepare read or allocate them.
    """
    with _idx_errors(path), _idx_stream(path) as stream:
        shape = _idx_shape(stream, path)
        expected = math.prod(shape)
        if expected > max_bytes:
            raise SourceError(
                f"{path} claims {_shape_text(shape)} = {expected / 2**20:.0f} MiB of values, over "
                f"prepare.max_dataset_mib ({max_bytes // 2**20}); raise it if the file is genuine"
            )
        data = _read_at_most(stream, expected + 1)
    if len(data) != expected:
        found = f"{len(data)}" if len(data) < expected else "more"
        raise SourceError(f"{path} does not match its header: it claims {_shape_text(shape)} = {expected} values, and holds {found}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)
