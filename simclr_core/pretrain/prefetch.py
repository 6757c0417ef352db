"""The next step's views, made in a background thread while the current step trains."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["Prefetcher"]


class Prefetcher:
    """Makes the next step's views in a background thread while the current step trains.

    ``make(step)`` must be a pure function of the step (the trainer's views are), so the
    order of work does not change what is computed. :meth:`get` returns the views and the
    seconds the loop waited for them (the data wait; near zero when the data path keeps up).

    The background thread runs torch ops on one thread (``data_threads``): left at torch's
    default it starts an OpenMP team of its own, and two teams on the same cores stall each
    other's barriers (on 2 cores the step lost 11% to a data path that costs 5% of it;
    benchmarks/bench_step.py). The training thread keeps its own count.

    On a CUDA ``device`` the views are made on a stream of their own. On the training stream,
    each host sync of the data path (the copy of a step's parameters, a ``nonzero``) would wait
    for every training kernel queued before it, so the thread could never get ahead; on its own
    stream it waits only for its own work. :meth:`get` orders the training stream after the
    views' event (the device waits, not the host) and tells the caching allocator that the
    training stream uses them, so their memory is not handed back to the data stream too early.
    """

    def __init__(
        self, make: Callable[[int], torch.Tensor], first_step: int, total_steps: int, data_threads: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self._make, self._total = make, total_steps
        self._stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self._device = device
        self._train_threads = torch.get_num_threads()
        # OpenMP keeps a thread count per thread, but torch also keeps one process-wide default:
        # pin the training thread's own count before the data thread changes the default.
        torch.set_num_threads(self._train_threads)
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="simclr-data", initializer=torch.set_num_threads, initargs=(data_threads,)
        )
        self._pending = self._submit(first_step)

    def _submit(self, step: int) -> Future | None:
        return self._pool.submit(self._make_on_stream, step) if step < self._total else None

    def _make_on_stream(self, step: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The views of ``step`` and, on CUDA, the event recorded on the data stream after them."""
        if self._stream is None:
            return self._make(step), None
        with torch.cuda.stream(self._stream):
            views = self._make(step)
            return views, self._stream.record_event()

    def get(self, step: int) -> tuple[torch.Tensor, float]:
        """The views of ``step`` (the step after the previous call's) and the seconds waited for them."""
        start = time.perf_counter()
        views, ready = self._pending.result()
        waited = time.perf_counter() - start
        if ready is not None:
            training_stream = torch.cuda.current_stream(self._device)
            training_stream.wait_event(ready)
            views.record_stream(training_stream)
        self._pending = self._submit(step + 1)
        return views, waited

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._train_threads)  # the process-wide default back as it was
