"""The checkpoint manager: what it keeps, what it refuses, how it falls back."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
import torch

from simclr_core.checkpoint import LATEST, CheckpointError, CheckpointManager, load_checkpoint
from simclr_core.storage import LocalStore


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step}


def test_keeps_the_last_k_and_the_best_by_knn_accuracy(tmp_path):
    manager = CheckpointManager(LocalStore(tmp_path), keep_last=2)
    scores = {1: 0.2, 2: 0.9, 3: 0.5, 4: None, 5: 0.4, 6: None}
    for step, score in scores.items():
        manager.save(_state(step), step, score)
    assert [meta["step"] for meta in manager.list()] == [6, 5, 2]  # last two + the best (step 2)
    assert manager.best()["step"] == 2
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == [
        "latest.json", "step-00000002.pt", "step-00000002.pt.json", "step-00000005.pt", "step-00000005.pt.json",
        "step-00000006.pt", "step-00000006.pt.json",
    ]


def test_metadata_holds_the_files_sha256_and_latest_points_to_the_newest(tmp_path):
    manager = CheckpointManager(LocalStore(tmp_path))
    meta = manager.save(_state(7), 7, 0.5)
    data = (tmp_path / meta["file"]).read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
    assert json.loads((tmp_path / LATEST).read_text()) == meta
    state, loaded_meta = manager.load_latest()
    assert loaded_meta == meta and torch.equal(state["model"]["w"], torch.full((3,), 7.0))


def test_a_checkpoint_failing_its_check_is_skipped_for_the_previous_good_one(tmp_path, caplog):
    manager = CheckpointManager(LocalStore(tmp_path), keep_last=3)
    for step in (1, 2, 3):
        manager.save(_state(step), step)
    (tmp_path / "checkpoints" / "step-00000003.pt").write_bytes(b"truncated")
    os.remove(tmp_path / "checkpoints" / "step-00000002.pt")
    with caplog.at_level("WARNING"):
        state, meta = manager.load_latest()
    assert meta["step"] == 1 and state["step"] == 1
    assert "step-00000003.pt" in caplog.text and "does not match its metadata" in caplog.text
    assert "step-00000002.pt" in caplog.text and "does not exist" in caplog.text


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert CheckpointManager(LocalStore(tmp_path)).load_latest() is None


class _RunsCode:
    """Pickles into a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_that_carries_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(f"touch {marker}")}, buffer)
    evil = tmp_path / "model.pt"
    evil.write_bytes(buffer.getvalue())

    with pytest.raises(CheckpointError, match=r"model\.pt was refused: it asks to import posix\.system"):
        load_checkpoint(evil)
    assert not marker.exists()

    # the same file smuggled into a run's checkpoints, with a matching sha256: still refused
    manager = CheckpointManager(LocalStore(tmp_path / "run"))
    good = manager.save(_state(1), 1)
    bad = manager.save(_state(2), 2)
    (tmp_path / "run" / bad["file"]).write_bytes(buffer.getvalue())
    forged = dict(bad, sha256=hashlib.sha256(buffer.getvalue()).hexdigest(), bytes=len(buffer.getvalue()))
    for key in (f"{bad['file']}.json", LATEST):
        (tmp_path / "run" / key).write_text(json.dumps(forged))
    state, meta = manager.load_latest()
    assert meta == good and not marker.exists()


def test_clear_removes_every_checkpoint(tmp_path):
    manager = CheckpointManager(LocalStore(tmp_path))
    manager.save(_state(1), 1)
    manager.clear()
    assert manager.load_latest() is None and list((tmp_path / "checkpoints").iterdir()) == []


# A checkpoint pointer is data, not a path to follow (issue: a latest.json naming /dev/zero made
# resume read without end; a FIFO named like a checkpoint hung it).
HOSTILE_POINTERS = {
    "a device": {"file": "/dev/zero", "step": 9, "sha256": "0" * 64, "bytes": 10},
    "a path outside the run": {"file": "../../etc/passwd", "step": 9, "sha256": "0" * 64, "bytes": 10},
    "another step's file": {"file": "checkpoints/step-00000001.pt", "step": 9, "sha256": "0" * 64, "bytes": 10},
    "a list": [],
    "no step": {"file": "checkpoints/step-00000009.pt", "sha256": "0" * 64, "bytes": 10},
    "a huge size": {"file": "checkpoints/step-00000009.pt", "step": 9, "sha256": "0" * 64, "bytes": 1 << 40},
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pointer", list(HOSTILE_POINTERS))
def test_a_hostile_latest_pointer_is_skipped_for_the_newest_good_checkpoint(tmp_path, caplog, pointer):
    manager = CheckpointManager(LocalStore(tmp_path), keep_last=3)
    for step in (1, 2):
        manager.save(_state(step), step)
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps(HOSTILE_POINTERS[pointer]))
    with caplog.at_level("WARNING"):
        state, meta = manager.load_latest()
    assert meta["step"] == 2 and state["step"] == 2
    assert "skipping checkpoint" in caplog.text  # said, not silent


@pytest.mark.timeout(30)
def test_special_files_named_like_checkpoints_are_refused_unread(tmp_path, caplog):
    """A FIFO as the newest checkpoint, and latest.json as a link to /dev/zero: neither is read."""
    manager = CheckpointManager(LocalStore(tmp_path), keep_last=3)
    for step in (1, 2):
        manager.save(_state(step), step)
    checkpoint = tmp_path / "checkpoints" / "step-00000002.pt"
    checkpoint.unlink()
    os.mkfifo(checkpoint)  # a read of it would block forever
    latest = tmp_path / "checkpoints" / "latest.json"
    latest.unlink()
    latest.symlink_to("/dev/zero")  # a read of it would never end
    with caplog.at_level("WARNING"):
        state, meta = manager.load_latest()
    assert meta["step"] == 1 and state["step"] == 1
    assert "is not a regular file" in caplog.text
