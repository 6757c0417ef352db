"""storage.download_all: a remote tree downloaded many objects at a time, bounded, stopping at
the first failure. (The real clients behind it are exercised in test_gcs.py and test_s3.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from simclr_core.storage import StorageError, Store, download_all


class _SlowStore(Store):
    """Objects that take 10 ms each to arrive; notes how many were in flight at once."""

    root = "gs://fake"

    def __init__(self, failing: str = "") -> None:
        self.failing, self.lock, self.active, self.most, self.fetched = failing, threading.Lock(), 0, 0, []

    def get_file(self, key: str, local_path: Path) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.01)
            if key == self.failing:
                raise StorageError(f"{self.uri(key)} does not exist")
            local_path.parent.mkdir(parents=True, exist_ok=True)
            local_path.write_text(key)
            with self.lock:
                self.fetched.append(key)
        finally:
            with self.lock:
                self.active -= 1


def test_every_object_arrives_several_at_a_time(tmp_path):
    keys = [f"train/c{index % 3}/{index}.png" for index in range(120)]
    store = _SlowStore()
    download_all(store, keys, tmp_path, threads=8)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == sorted(keys)
    assert all((tmp_path / key).read_text() == key for key in keys)
    assert 1 < store.most <= 8


def test_the_first_failure_is_raised_and_stops_the_rest(tmp_path):
    keys = [f"{index:04d}.png" for index in range(1000)]
    store = _SlowStore(failing="0010.png")
    with pytest.raises(StorageError, match="gs://fake/0010.png does not exist"):
        download_all(store, keys, tmp_path, threads=4)
    assert len(store.fetched) < 100  # at most the 16 queued behind the failure, not the whole tree
