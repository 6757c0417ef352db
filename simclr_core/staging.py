"""Node-local staging: copy a prepared dataset to fast local storage once per pod, then train from it.

A multi-node job reads its dataset from a shared volume (a ReadWriteMany PVC: NFS, Filestore,
CephFS, ...) or an object store. Pretraining reads images at random, a few KiB at a time, from a
memory map: over a network filesystem every page fault is a round trip. With
``pretrain.stage_dir`` set, each pod first copies the dataset to ``stage_dir`` (an emptyDir on
the node's disk or local SSD) and trains from the copy.

:func:`stage_dataset` guarantees:

- **once per pod**: the copy goes to ``stage_dir/<16 hex digits of the manifest's sha256>``;
  a complete copy has its ``manifest.json`` (written last, byte for byte the source's), and a
  second call (another process, a torchrun restart) reads only the two manifests and the files'
  sizes and returns at once;
- **one copier**: the processes of a pod (``torchrun --nproc-per-node N``) all call it; an
  ``fcntl.flock`` on ``stage_dir/.lock`` lets one copy while the others wait, then find the
  copy complete. The kernel drops the lock when its holder dies, so a killed copier's place is
  taken by the next process;
- **verified**: each file is hashed while it is written and must match the manifest's sha256
  before it is renamed into place; a mismatch removes the bad ``.part`` and raises
  :class:`~simclr_core.data.prepared.DatasetCorrupt` naming the file;
- **resumed**: each file is written to ``NAME.part``; an interrupted copy from a local path
  (a PVC) continues from the ``.part``'s size, reading only the rest of the source (the
  ``.part``'s own bytes are re-read locally to hash them). A resumed file that fails its
  sha256 is copied once more from the start (a crash may have left a torn tail) before the
  mismatch is reported. From gs:// and s3:// a file is downloaded whole through the store
  (:meth:`~simclr_core.storage.Store.get_file`, which already retries), so an interrupted
  download restarts that file; files already complete are kept;
- **space**: the bytes still to copy are checked against the free space of ``stage_dir``
  before copying, and a full disk midway is reported the same way, naming ``stage_dir`` and
  the bytes needed (:class:`StagingSpaceError`). A Kubernetes emptyDir's ``sizeLimit`` is not
  visible to ``statvfs``: the kubelet evicts a pod that exceeds it, so size it above the
  dataset.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from simclr_core.data.prepared import DatasetCorrupt
from simclr_core.manifest import MAX_MANIFEST_BYTES, SourceError, check_manifest
from simclr_core.storage import Store, is_remote, open_store, write_atomic

__all__ = ["stage_dataset", "staged_name", "StagingSpaceError", "BLOCK_BYTES", "LOCK_NAME"]

log = logging.getLogger("simclr.staging")

BLOCK_BYTES = 8 * 2**20  # read and write in 8 MiB blocks
LOCK_NAME = ".lock"
MANIFEST = "manifest.json"
PART_SUFFIX = ".part"


class StagingSpaceError(OSError):
    """``stage_dir`` has too little space for the dataset; the message names it and the bytes needed."""


def staged_name(manifest_bytes: bytes) -> str:
    """The directory name of a dataset under ``stage_dir``: 16 hex digits of its manifest's sha256
    (a new ``prepare`` writes a new manifest, so a new version never mixes with an old copy)."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


def stage_dataset(source: str | Path, stage_dir: str | Path, progress: bool = True) -> Path:
    """Copy the prepared dataset at ``source`` (a local path, gs:// or s3:// URI) into
    ``stage_dir`` once, verified, and return the local copy's directory (see the module's docstring).

    Raises:
        SourceError: ``source`` is not a prepared dataset (no or an invalid manifest).
        DatasetCorrupt: a copied file does not match its sha256 (the message names it).
        StagingSpaceError: ``stage_dir`` is too small.
        StorageError, StorageUnavailable: from the store of a gs:// or s3:// source.
    """
    stage_dir = Path(stage_dir)
    with open_store(source) as store:
        manifest_bytes, files = _read_source_manifest(store, source)
        target = stage_dir / staged_name(manifest_bytes)
        if _is_complete(target, manifest_bytes, files):
            log.info("staging: %s is staged already at %s", source, target)
            return target
        stage_dir.mkdir(parents=True, exist_ok=True)
        with _stage_lock(stage_dir):
            if _is_complete(target, manifest_bytes, files):  # another process of this pod copied it meanwhile
                log.info("staging: another process staged %s at %s", source, target)
                return target
            (target / MANIFEST).unlink(missing_ok=True)  # a copy found incomplete is not complete while it is mended
            _copy_all(store, source, target, files, progress)
            write_atomic(target / MANIFEST, lambda stream: stream.write(manifest_bytes), mode="wb")  # last: the copy is complete
    log.info("staging: %s is staged at %s", source, target)
    return target


# ------------------------------------------------------------------------------ the source


def _read_source_manifest(store: Store, source: str | Path) -> tuple[bytes, dict[str, tuple[str, int]]]:
    """The source manifest's bytes and ``{file: (sha256, size)}`` of the files it lists."""
    if not store.exists(MANIFEST):
        raise SourceError(f"{source} is not a prepared dataset (no {MANIFEST}); run `simclr prepare` first")
    if store.size(MANIFEST) > MAX_MANIFEST_BYTES:
        raise SourceError(f"{source}/{MANIFEST} is larger than the {MAX_MANIFEST_BYTES} bytes a prepared dataset writes")
    manifest_bytes = store.read_bytes(MANIFEST)
    try:
        manifest: Any = json.loads(manifest_bytes)
    except (ValueError, UnicodeDecodeError) as error:
        raise SourceError(f"{source}/{MANIFEST} is not valid JSON ({str(error)[:120]}); run `simclr prepare` again") from None
    if not isinstance(manifest, dict):
        raise SourceError(f"{source}/{MANIFEST} does not hold a JSON object; run `simclr prepare` again")
    check_manifest(Path(str(source)), manifest)  # the file names are then plain names (no '/', no '..')
    files = {name: (sha, store.size(name)) for name, sha in sorted(manifest["files"].items())}
    return manifest_bytes, files


def _is_complete(target: Path, manifest_bytes: bytes, files: dict[str, tuple[str, int]]) -> bool:
    """A finished copy of this dataset: its manifest (written last) and every file at its size."""
    try:
        if (target / MANIFEST).read_bytes() != manifest_bytes:
            return False
        return all((target / name).stat().st_size == size for name, (_, size) in files.items())
    except OSError:
        return False


@contextlib.contextmanager
def _stage_lock(stage_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``stage_dir/.lock``: one copier per pod, the others wait for it."""
    with open(stage_dir / LOCK_NAME, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("staging: another process of this pod is copying into %s; waiting for it", stage_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ copying


def _copy_all(store: Store, source: str | Path, target: Path, files: dict[str, tuple[str, int]], progress: bool) -> None:
    """Copy every listed file that is not in place yet, with one progress bar in bytes."""
    target.mkdir(parents=True, exist_ok=True)
    todo = {name: info for name, info in files.items() if not _file_done(target / name, info[1])}
    total = sum(size for _, size in todo.values())
    remote = is_remote(source)  # a download restarts its file (see the module's docstring)
    present = {name: 0 if remote else _part_size(target / (name + PART_SUFFIX), size) for name, (_, size) in todo.items()}
    _check_space(target, total - sum(present.values()), source)
    log.info("staging: copying %d file(s), %.1f MiB, from %s to %s%s", len(todo), total / 2**20, source, target,
             f" (resuming: {sum(present.values()) / 2**20:.1f} MiB there already)" if any(present.values()) else "")
    with _progress_bar(total, sum(present.values()), progress) as bar:
        for name, (sha, size) in todo.items():
            with _space_errors(target, source, total):
                if remote:
                    _download_file(store, name, target, sha, bar)
                else:
                    _copy_file(Path(str(source)) / name, target, name, sha, size, bar)


def _file_done(path: Path, size: int) -> bool:
    """A file renamed into place (it was verified before the rename) at the source's size."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _part_size(part: Path, size: int) -> int:
    """Bytes of an interrupted copy to resume from; a ``.part`` longer than the source is discarded."""
    try:
        have = part.stat().st_size
    except OSError:
        return 0
    if have > size:
        part.unlink()
        return 0
    return have


def _check_space(target: Path, needed: int, source: str | Path) -> None:
    free = shutil.disk_usage(target).free
    if needed > free:
        raise StagingSpaceError(_space_message(target.parent, source, needed, free))


def _space_message(stage_dir: Path, source: str | Path, needed: int, free: int) -> str:
    return (
        f"stage_dir {stage_dir} has {free} bytes ({free / 2**30:.2f} GiB) free, but staging {source} needs {needed} more "
        f"({needed / 2**30:.2f} GiB): give the staging volume more space (the emptyDir's sizeLimit and the node's disk), "
        "or set pretrain.stage_dir '' to read the dataset in place"
    )


@contextlib.contextmanager
def _space_errors(target: Path, source: str | Path, total: int) -> Iterator[None]:
    """A full disk midway becomes a :class:`StagingSpaceError` naming stage_dir and the bytes needed."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(error, StagingSpaceError):
            raise
        raise StagingSpaceError(_space_message(target.parent, source, total, shutil.disk_usage(target).free)) from None


@contextlib.contextmanager
def _progress_bar(total: int, initial: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc="staging",
              disable=not enabled or total == 0, mininterval=0.5 if interactive else 30.0, file=sys.stderr) as bar:
        yield bar


def _copy_file(src: Path, target: Path, name: str, sha: str, size: int, bar: Any) -> None:
    """Copy the local file ``src`` to ``target/name`` through ``name.part``, resuming from the
    ``.part``'s size, hashing while writing; renamed into place when its sha256 matches."""
    part = target / (name + PART_SUFFIX)
    start = _part_size(part, size)
    digest = _copy_from(src, part, start, bar)
    if digest != sha and start > 0:
        log.warning("staging: the resumed copy of %s does not match its sha256; copying it again from the start", name)
        bar.update(-start)
        part.unlink()
        digest = _copy_from(src, part, 0, bar)
    _finish(part, target / name, digest, sha, src)


def _copy_from(src: Path, part: Path, start: int, bar: Any) -> str:
    """Append ``src[start:]`` to ``part`` (hashing ``part``'s first ``start`` bytes first); the sha256 of the whole."""
    digest = hashlib.sha256()
    with open(part, "a+b") as out:
        out.seek(0)
        _hash_stream(out, start, digest)
        out.truncate(start)  # what was hashed is what stays
        with open(src, "rb") as stream:
            stream.seek(start)
            _pump(stream, out, digest, bar)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _hash_stream(stream: IO[bytes], length: int, digest: Any) -> None:
    left = length
    while left > 0:
        block = stream.read(min(BLOCK_BYTES, left))
        if not block:
            break
        digest.update(block)
        left -= len(block)


def _pump(stream: IO[bytes], out: IO[bytes], digest: Any, bar: Any) -> None:
    for block in iter(lambda: stream.read(BLOCK_BYTES), b""):
        out.write(block)
        digest.update(block)
        bar.update(len(block))


def _download_file(store: Store, name: str, target: Path, sha: str, bar: Any) -> None:
    """Download ``name`` whole from a gs:// or s3:// store into ``name.part``, hash it, rename it."""
    part = target / (name + PART_SUFFIX)
    part.unlink(missing_ok=True)
    store.get_file(name, part)
    digest = hashlib.sha256()
    with open(part, "rb") as stream:
        for block in iter(lambda: stream.read(BLOCK_BYTES), b""):
            digest.update(block)
            bar.update(len(block))
    _finish(part, target / name, digest.hexdigest(), sha, store.uri(name))


def _finish(part: Path, final: Path, digest: str, expected: str, src: Any) -> None:
    """Rename a verified ``part`` to ``final``; a mismatch removes it and raises DatasetCorrupt naming the file."""
    if digest != expected:
        part.unlink(missing_ok=True)
        raise DatasetCorrupt(
            f"{src} does not match its sha256 in the manifest (expected {expected[:12]}..., copied {digest[:12]}...): "
            f"the source was changed or corrupted after prepare, or the copy to {final.parent} was; nothing of it was kept. "
            "Run `simclr verify` on the source, and `simclr prepare` again if it fails"
        )
    os.replace(part, final)
