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


class _FakeCuda:
    """Stands in for torch.cuda's stream API and records, in order, what the Prefetcher asks of it."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.current = "training-stream"

    def Stream(self, device):  # noqa: N802  torch.cuda.Stream
        fake = self

        class Stream:
            def record_event(self):
                fake.calls.append(("record_event", fake.current))
                return f"event-after-{fake.made[-1]}"

        return Stream()

    def stream(self, stream):
        fake = self

        class Context:
            def __enter__(self):
                fake.calls.append(("enter data stream",))
                fake.current = "data-stream"

            def __exit__(self, *exc):
                fake.calls.append(("leave data stream",))
                fake.current = "training-stream"

        return Context()

    def current_stream(self, device):
        fake = self

        class Current:
            name = fake.current

            def wait_event(self, event):
                fake.calls.append(("wait_event", self.name, event))

        return Current()


def test_on_cuda_the_views_are_made_on_their_own_stream_and_the_training_stream_waits_for_them(monkeypatch):
    fake = _FakeCuda()
    fake.made = []
    for name in ("Stream", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    class Views:
        def __init__(self, step):
            self.step = step

        def record_stream(self, stream):
            fake.calls.append(("record_stream", self.step, stream.name))

    def make(step: int) -> Views:
        fake.made.append(step)
        fake.calls.append(("make", step, fake.current))
        return Views(step)

    batches = Prefetcher(make, first_step=0, total_steps=2, device=torch.device("cuda", 0))
    try:
        first, _ = batches.get(0)
        batches._pending.result()  # let step 1's views finish before looking at the record
        calls_after_first = list(fake.calls)
        second, _ = batches.get(1)
    finally:
        batches.close()
    assert (first.step, second.step) == (0, 1)
    step0 = calls_after_first[: calls_after_first.index(("record_stream", 0, "training-stream")) + 1]
    assert step0 == [
        ("enter data stream",), ("make", 0, "data-stream"), ("record_event", "data-stream"), ("leave data stream",),
        ("wait_event", "training-stream", "event-after-0"),  # the device waits for the views, the host does not
        ("record_stream", 0, "training-stream"),  # their memory is not reused while training reads them
    ]
    assert fake.calls[-2:] == [("wait_event", "training-stream", "event-after-1"), ("record_stream", 1, "training-stream")]


def test_on_a_cpu_no_stream_is_involved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: pytest.fail("a CUDA stream on a CPU run"))
    batches = Prefetcher(lambda step: torch.zeros(1), first_step=0, total_steps=1, device=torch.device("cpu"))
    try:
        assert batches.get(0)[0].tolist() == [0.0]
    finally:
        batches.close()
