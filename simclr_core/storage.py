"""Writing results without leaving half-written files: temporary name, fsync, rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["write_atomic", "write_text", "write_json"]


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Call ``write(stream)`` on a temporary file beside ``path``, fsync, then rename it to ``path``.

    Readers see the old file or the new one, never half of one; on failure nothing is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda stream: stream.write(text))


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
