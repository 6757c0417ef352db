"""One writer at a time per output directory: an ``fcntl.flock`` on a lock file.

Two runs writing to one ``--out`` would each clean up the other's temporary files and, with
other settings, delete the other's checkpoints. The writer (rank 0 of a pretraining run, the
one process of ``simclr prepare``) therefore holds an exclusive ``flock`` on a lock file before
it cleans up or writes anything there; a second writer is refused with :class:`RunLocked`
(exit code 2), which names the holder written into the file: pid, host, start time, command.

The kernel drops a ``flock`` when its holder dies, however it dies (SIGKILL, OOM, a node
lost), so a lock file whose lock can be taken is stale by definition and is taken over. This
holds on NFS v4 as well, where Linux maps ``flock`` to POSIX byte-range locks, so two pods
sharing a ReadWriteMany volume exclude each other. gs:// and s3:// outputs get no lock (object
stores have none to offer); their local staging directories are private to each run anyway.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Iterator

from simclr_core.storage import StorageError, is_remote

__all__ = ["RunLocked", "run_lock", "LOCK_NAME"]

log = logging.getLogger("simclr.runlock")

LOCK_NAME = ".lock"
_MAX_HOLDER_BYTES = 64 * 1024  # the holder's record is small; a huge file is not one of ours


class RunLocked(StorageError):
    """Another live process holds the output directory's lock (a usage error: exit code 2)."""


@contextlib.contextmanager
def run_lock(out: str | Path, beside: bool = False, enabled: bool = True) -> Iterator[Path | None]:
    """Hold the lock of the output directory ``out`` for the block; yields the lock file's path.

    ``beside``: the lock file is ``.NAME.lock`` next to ``out`` rather than ``out/.lock``, for
    outputs replaced whole by a rename (a prepared dataset). ``enabled=False`` (ranks other than
    0) and gs:// or s3:// outputs yield None and lock nothing. Directories made for the lock are
    removed again if the block leaves them empty. Raises :class:`RunLocked` while another
    process holds the lock.
    """
    if not enabled:
        yield None
        return
    if is_remote(out):
        log.info("%s is in an object store: no lock keeps a second run from writing there at the same time", out)
        yield None
        return
    out = Path(os.path.abspath(out)) if beside else Path(out)  # abspath: the parent of "." is not "."
    path = out.parent / f".{out.name}.lock" if beside else out / LOCK_NAME
    made = _make_dirs(path.parent)
    try:
        fd = _acquire(path, out)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # while still holding it: see _acquire
            os.close(fd)
    finally:
        for directory in reversed(made):  # a refused or failed run leaves no empty output behind
            with contextlib.suppress(OSError):
                directory.rmdir()


def _make_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those made, outermost first."""
    missing = [parent for parent in (directory, *directory.parents) if not parent.exists()][::-1]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _acquire(path: Path, out: Path) -> int:
    """Lock ``path`` (creating it) and write this process into it; return the open descriptor.

    A releasing holder unlinks the file before closing it, so a process that opened the old
    file in between may lock an unlinked inode: the lock only counts if ``path`` still names
    the inode locked, else the new file is tried.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_flock(fd, path):
                raise RunLocked(f"{out} is in use by another run ({_describe(_read_holder(fd))}); "
                                f"wait for it to end or write to another directory (lock file {path})")
            if _same_file(fd, path):
                _take_over(fd, path)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _try_flock(fd: int, path: Path) -> bool:
    """True when the exclusive lock was taken, False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            # a filesystem without locks (old NFS without lockd): run, as before locks existed
            log.warning("%s: this filesystem offers no locks (%s); a second run writing here would not be stopped", path, error.strerror)
            return True
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _take_over(fd: int, path: Path) -> None:
    """Replace the record in the lock file by this process's, saying whose stale lock it was."""
    previous = _read_holder(fd)
    if previous:
        log.info("taking over the stale lock %s of a run that is gone (%s)", path, _describe(previous))
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict | None:
    """The record in the lock file; None when it is empty or not ours (a holder that has not
    written yet, or a foreign file)."""
    try:
        record = json.loads(os.pread(fd, _MAX_HOLDER_BYTES, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict | None) -> str:
    """``pid 12 on host a, started 2025-01-01T00:00:00+00:00, command simclr pretrain ...``."""
    if holder is None:
        return "holder unknown: its lock file has no record yet"
    pid, host, started = (_printable(holder.get(name), 100) for name in ("pid", "host", "started"))
    return f"pid {pid} on host {host}, started {started}, command {_printable(holder.get('command'), 500)}"


def _printable(value: object, limit: int) -> str:
    """``value`` cut to ``limit`` characters, control characters as "?": the file is not trusted,
    and a newline in it must not forge a line of the log."""
    text = "?" if value is None else str(value)
    return "".join(char if char.isprintable() else "?" for char in text[:limit])
