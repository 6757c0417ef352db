"""The project's random streams: one name for each, one generator per (seed, stream, index).

Every random draw of training and evaluation comes from a generator seeded with
``(seed, stream, index)`` through numpy's SeedSequence, never from torch's global generator
(which only seeds the initial weights). So a draw is a pure function of the settings and of
where it is made (the epoch, the step, the augmented copy), whatever the world size, and a
resumed run draws what an uninterrupted one would.

The values of :class:`RandomStream` are part of every result: changing one changes every
number drawn from that stream. tests/test_random_streams.py pins them.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

__all__ = ["RandomStream", "seeded_generator"]


class RandomStream(enum.IntEnum):
    """What a generator draws; the index it is drawn with is in brackets."""

    PRETRAIN_ORDER = 1  # pretraining: the order of the training images (epoch)
    PRETRAIN_VIEWS = 2  # pretraining: the augmentation parameters of the step's 2B views (step)
    LINEAR_EVAL_COPY = 3  # linear evaluation: the crop + flip of an augmented copy of the training images (copy)
    CLASSIFIER_ORDER = 4  # fine-tuning a classifier: the order of the labelled images (epoch)
    CLASSIFIER_VIEWS = 5  # fine-tuning a classifier: the crop + flip of the step's batch (step)


def seeded_generator(seed: int, stream: RandomStream, *index: int) -> torch.Generator:
    """A CPU generator for ``stream`` at ``index``, seeded from (seed, stream, *index) through
    numpy's SeedSequence (no collisions between streams or indices)."""
    keys = [int(seed), int(stream), *(int(i) for i in index)]
    state = int(np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(state)
