"""Checkpoints: written atomically, verified by sha256, loaded without unpickling code.

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``: a file that carries code (a pickled callable, say) is
refused, never run.

:class:`CheckpointManager` keeps a run's checkpoints in a store (a local directory or a
gs:// or s3:// prefix)::

    checkpoints/step-00000300.pt        the state
    checkpoints/step-00000300.pt.json   its metadata: step, sha256, size, kNN accuracy, time
    checkpoints/latest.json             the newest metadata, written last (the commit point)

A save writes the state (temporary name + fsync + rename locally; one upload on GCS), then
its metadata, then ``latest.json``; a process killed at any moment leaves the previous
checkpoint as the latest. Loading checks the sha256; a checkpoint that fails the check (or
cannot be read) is skipped with a warning for the next older one. Saves keep the last
``keep_last`` checkpoints plus the best by kNN accuracy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from simclr_core.storage import Store, StorageError, is_remote, make_shareable, read_bytes, sha256_file, write_atomic
from simclr_core.errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "CheckpointManager"]

log = logging.getLogger("simclr.checkpoint")

CHECKPOINT_DIR = "checkpoints"
LATEST = f"{CHECKPOINT_DIR}/latest.json"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_METADATA_BYTES = 64 * 1024  # a checkpoint's metadata is a few hundred bytes


class _KeepsWriteError:
    """A binary stream that remembers the OSError of its last failed write.

    torch.save turns a failed write (a full disk) into ``RuntimeError: unexpected pos``,
    which loses the errno; :func:`torch_save` raises the remembered OSError instead.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self._stream.flush()


def torch_save(state: dict[str, Any], stream: Any) -> None:
    """``torch.save(state, stream)``; a failed write raises its own OSError (ENOSPC, EIO, EROFS)."""
    keeping = _KeepsWriteError(stream)
    try:
        torch.save(state, keeping)
    except RuntimeError:
        if keeping.error is None:
            raise
        raise keeping.error from None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to the local ``path`` atomically: temporary file, fsync, rename."""
    write_atomic(path, lambda stream: torch_save(state, stream), mode="wb")


def _load_bytes(data: bytes, source: str, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # refused globals, pickle errors, truncated files
        text = str(error)
        refused = re.search(r"GLOBAL (\S+)", text)
        if refused:
            raise CheckpointError(
                f"checkpoint {source} was refused: it asks to import {refused.group(1)}, and a checkpoint may only hold "
                "tensors and plain values. It was not unpickled; load only checkpoints written by `simclr pretrain`"
            ) from None
        reason = "truncated or corrupt" if "zip archive" in text else "not a torch checkpoint, or corrupt"
        raise CheckpointError(f"checkpoint {source} cannot be read: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} does not hold a state dict")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (local path, gs:// or s3:// URI) of tensors and plain values only."""
    if not is_remote(path) and not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = read_bytes(path)
    except StorageError as error:
        raise CheckpointError(f"checkpoint {error}") from None
    return _load_bytes(data, str(path), map_location)


class CheckpointManager:
    """The checkpoints of one run in ``store`` (see the module docstring for the layout)."""

    def __init__(self, store: Store, keep_last: int = 3) -> None:
        self.store = store
        self.keep_last = keep_last

    # -------------------------------------------------------------- saving

    def save(self, state: dict[str, Any], step: int, knn_accuracy: float | None = None) -> dict[str, Any]:
        """Write ``state`` as the checkpoint of ``step`` and make it the latest; returns its metadata."""
        name = f"{CHECKPOINT_DIR}/step-{step:08d}.pt"
        handle, tmp_name = tempfile.mkstemp(prefix=".step-", suffix=".tmp", dir=self._scratch())
        tmp = Path(tmp_name)
        try:
            make_shareable(handle)
            with os.fdopen(handle, "wb") as stream:
                torch_save(state, stream)
                stream.flush()
                os.fsync(stream.fileno())
            meta = {
                "file": name, "step": step, "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size,
                "knn_accuracy": knn_accuracy, "saved_at": time.time(),
            }
            self.store.put_file(tmp, name)
        except OSError as error:  # a full disk, a read-only volume: say which checkpoint
            raise OSError(error.errno, f"{error.strerror or error} while writing checkpoint {self.store.uri(name)}") from error
        finally:
            tmp.unlink(missing_ok=True)
        text = json.dumps(meta, sort_keys=True).encode()
        self.store.write_bytes(f"{name}.json", text)
        self.store.write_bytes(LATEST, text)  # the commit point
        self._prune()
        return meta

    def _scratch(self) -> Path:
        """Where a checkpoint is written before it is renamed (locally) or uploaded (GCS)."""
        scratch = self.store.scratch_dir() / CHECKPOINT_DIR
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch

    def _prune(self) -> None:
        """Keep the last ``keep_last`` checkpoints and the best by kNN accuracy; delete the rest."""
        metas = self.list()
        keep = {meta["file"] for meta in metas[: self.keep_last]}
        scored = [meta for meta in metas if meta.get("knn_accuracy") is not None]
        if scored:
            keep.add(max(scored, key=lambda meta: (meta["knn_accuracy"], meta["step"]))["file"])
        for meta in metas:
            if meta["file"] not in keep:
                self.store.delete(f"{meta['file']}.json")  # metadata first: a lone .pt is never loaded
                self.store.delete(meta["file"])
        for stale in self._scratch().glob(".step-*.tmp"):  # left by writes killed half-way
            stale.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every checkpoint of this run (another run is about to start here)."""
        self.store.delete(LATEST)
        for key in self.store.list(CHECKPOINT_DIR):
            if key.endswith(".json"):
                self.store.delete(key)
        for key in self.store.list(CHECKPOINT_DIR):
            self.store.delete(key)

    # -------------------------------------------------------------- loading

    def list(self) -> list[dict[str, Any]]:
        """Metadata of the stored checkpoints, newest first (unreadable or invalid metadata is
        skipped with a warning)."""
        metas = []
        for key in self.store.list(CHECKPOINT_DIR):
            if key.endswith(".pt.json") and _NAME.match(Path(key[: -len(".json")]).name):
                meta = self._read_metadata(key)
                if meta is not None:
                    metas.append(meta)
        return sorted(metas, key=lambda meta: meta["step"], reverse=True)

    def _read_metadata(self, key: str) -> dict[str, Any] | None:
        """The checkpoint metadata in ``key``, or None (with a warning) when it is not a small
        regular file holding a valid entry. The metadata is a pointer: it is trusted to name
        a file only as ``checkpoints/step-<step>.pt`` with that very step, never a path."""
        try:
            size = self.store.size(key)
            if size > MAX_METADATA_BYTES:
                raise CheckpointError(f"{size} bytes, more than checkpoint metadata ever holds ({MAX_METADATA_BYTES})")
            meta = json.loads(self.store.read_bytes(key))
            _check_metadata(meta)
            return meta
        except (ValueError, StorageError) as error:  # CheckpointError and JSON errors are ValueErrors
            log.warning("skipping checkpoint metadata %s: %s", self.store.uri(key), str(error)[:300])
            return None

    def best(self) -> dict[str, Any] | None:
        scored = [meta for meta in self.list() if meta.get("knn_accuracy") is not None]
        return max(scored, key=lambda meta: (meta["knn_accuracy"], meta["step"])) if scored else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, metadata) of the newest checkpoint that passes its sha256 check, or None.

        Tries ``latest.json`` first, then every checkpoint by decreasing step; each one that
        is missing, fails its check or cannot be loaded is skipped with a warning.
        """
        candidates = []
        if self.store.exists(LATEST) or _is_link(self.store, LATEST):
            latest = self._read_metadata(LATEST)
            if latest is not None:
                candidates.append(latest)
        candidates += [meta for meta in self.list() if not candidates or meta["file"] != candidates[0]["file"]]
        for meta in candidates:
            try:
                return self._load_verified(meta, map_location), meta
            except (CheckpointError, StorageError) as error:
                log.warning("skipping checkpoint %s: %s; trying the previous one", self.store.uri(meta["file"]), error)
        return None

    def _load_verified(self, meta: dict[str, Any], map_location: str | torch.device) -> dict[str, Any]:
        size = self.store.size(meta["file"])  # a FIFO, a device or a file of another size is refused unread
        if size != meta["bytes"]:
            raise CheckpointError(f"its size, {size} bytes, does not match its metadata's {meta['bytes']} (truncated or replaced)")
        data = self.store.read_bytes(meta["file"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise CheckpointError(f"sha256 {digest[:12]}... does not match its metadata's {meta['sha256'][:12]}... (corrupt or truncated)")
        return _load_bytes(data, self.store.uri(meta["file"]), map_location)


def _check_metadata(meta: Any) -> None:
    """Raise CheckpointError unless ``meta`` is a checkpoint entry as :meth:`CheckpointManager.save` writes it."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"expected an object, found {type(meta).__name__}")
    step, sha256, size = meta.get("step"), meta.get("sha256"), meta.get("bytes")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"'step' must be an integer >= 0, found {step!r}"[:200])
    expected = f"{CHECKPOINT_DIR}/step-{step:08d}.pt"
    if meta.get("file") != expected:
        raise CheckpointError(f"'file' must be {expected!r} (a checkpoint of this run), found {meta.get('file')!r}"[:300])
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise CheckpointError("'sha256' must be 64 hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointError(f"'bytes' must be an integer >= 0, found {size!r}"[:200])


def _is_link(store: Store, key: str) -> bool:
    """A local ``key`` that is a symbolic link (exists() is False when it points nowhere real)."""
    return hasattr(store, "path") and os.path.islink(Path(store.path, key))

