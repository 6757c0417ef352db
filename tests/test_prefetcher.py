"""The trainer's background data thread: same views in step order, its own torch thread count."""

from __future__ import annotations

import threading

import pytest
import torch

from simclr_core.pretrain.prefetch import Prefetcher


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_prefetcher_returns_each_steps_views_in_order_and_stops_at_the_end():
    made = []

    def make(step: int) -> torch.Tensor:
        made.append(step)
        return torch.full((2,), float(step))

    batches = Prefetcher(make, first_step=3, total_steps=6)
    try:
        got = [batches.get(step)[0] for step in range(3, 6)]
    finally:
        batches.close()
    assert [t.tolist() for t in got] == [[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]
    assert made == [3, 4, 5]  # nothing past the last step is made


def test_data_thread_runs_on_its_own_thread_count_and_the_training_threads_keep_theirs(two_threads):
    seen = []

    def make(step: int) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return torch.zeros(1)

    batches = Prefetcher(make, first_step=0, total_steps=3, data_threads=1)
    try:
        for step in range(3):
            batches.get(step)
            assert torch.get_num_threads() == 2  # the training thread's OpenMP team is unchanged
    finally:
        batches.close()
    assert torch.get_num_threads() == 2
    assert all(name.startswith("simclr-data") and threads == 1 for name, threads in seen), seen

    # a thread started afterwards gets the process-wide default back, not the data thread's 1
    counts = []
    worker = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert counts == [2]
