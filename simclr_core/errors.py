"""Errors the CLI turns into exit codes, importable without torch (``simclr prepare`` never loads it).

The modules that raise them re-export them: ``simclr_core.checkpoint.CheckpointError`` and
``simclr_core.pretrain.TrainingError`` are these classes.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "TrainingError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not one of ours; the message names it."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, for one); the message names the step."""
