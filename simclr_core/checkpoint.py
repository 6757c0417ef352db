"""Checkpoints: written atomically, loaded without unpickling code.

A checkpoint is a dict of tensors and plain Python values saved with ``torch.save`` and read
with ``torch.load(weights_only=True)``, so a file that carries code is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simclr_core.storage import write_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one of ours; the message names it."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: temporary file, fsync, rename."""
    write_atomic(path, lambda stream: torch.save(state, stream), mode="wb")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle errors, truncated files, refused globals
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state
