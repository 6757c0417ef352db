"""Run a function in several gloo processes, the way torchrun or the Training Operator would.

Each process gets the standard environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
LOCAL_RANK) and calls :func:`simclr_core.launch.init_distributed` itself, so the tests
go through the same set-up as training. Results come back as whatever the worker returns.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import traceback
import urllib.request

import pytest

import torch
import torch.multiprocessing as mp


def start_server(argv: list[str], probe_url: str, what: str, timeout_s: float = 30) -> subprocess.Popen:
    """Start a local server (``argv``) and wait until ``probe_url`` answers; fail the test,
    with the server's last stderr, when it exits or does not answer within ``timeout_s``."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(probe_url, timeout=1)
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{what} did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from simclr_core.launch import destroy_distributed, init_distributed

    try:
        env = init_distributed(backend="gloo", device="cpu", timeout_s=120)
        result = fn(env, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        destroy_distributed()


def run_workers(fn, world_size: int, *args) -> list:
    """Run ``fn(env, *args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``fn`` must be a module-level function (it is pickled by reference for spawn).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        outcomes = [torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]
    for rank, outcome in enumerate(outcomes):
        if not outcome["ok"]:
            raise AssertionError(f"rank {rank} failed:\n{outcome['error']}")
    return [outcome["result"] for outcome in outcomes]
