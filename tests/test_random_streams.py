"""The named random streams draw exactly what the numbered ones drew: every result stays bit-identical."""

from __future__ import annotations

import numpy as np
import torch

from simclr_core.method.random_streams import RandomStream, seeded_generator


def test_stream_values_are_pinned():
    # Each value is part of every number drawn from its stream (checkpoints, metrics, results):
    # renaming a stream is free, renumbering one changes the results of every run.
    assert {stream.name: stream.value for stream in RandomStream} == {
        "PRETRAIN_ORDER": 1, "PRETRAIN_VIEWS": 2, "LINEAR_EVAL_COPY": 3, "CLASSIFIER_ORDER": 4, "CLASSIFIER_VIEWS": 5,
    }


def test_generator_seed_is_seedsequence_of_seed_stream_and_index():
    for stream in RandomStream:
        for seed, index in ((0, 0), (7, 3), (2**31 - 1, 123456)):
            keys = [seed, int(stream), index]
            expected = int(np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0] >> 1)
            assert seeded_generator(seed, stream, index).initial_seed() == expected
    assert seeded_generator(7, RandomStream.PRETRAIN_VIEWS, 3).initial_seed() == 1684239238610986860


def test_streams_and_indices_draw_apart():
    draws = {
        (stream, index): torch.randint(0, 2**62, (1,), generator=seeded_generator(0, stream, index)).item()
        for stream in RandomStream for index in range(4)
    }
    assert len(set(draws.values())) == len(draws)
