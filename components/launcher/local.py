"""The "local" backend: ``torchrun --nproc-per-node K -m simclr_core pretrain ...`` on this machine."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading

from components.launcher.core import LaunchError, Log, PretrainJob, register_backend

__all__ = ["LocalBackend", "local_command"]

# A launcher that itself runs under torchrun (or in a PyTorchJob pod) must not hand its own
# rendezvous to the training it starts: torchrun sets these for its children.
_DIST_VARS = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)


def local_command(job: PretrainJob) -> list[str]:
    """The command the local backend runs: a standalone torchrun of ``procs_per_node`` processes
    (``--standalone`` picks a free rendezvous port) under this very interpreter."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(job.procs_per_node), "-m", "simclr_core", "pretrain", *job.simclr_args,
    ]


def _child_env(job: PretrainJob) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    env.update(job.env)
    return env


class LocalBackend:
    """Runs the job's torchrun as a child process group on this machine (one node only).

    The output (stdout and stderr, merged) goes to ``log`` line by line. On a timeout, an
    exception or SIGTERM in the caller, the whole process group gets SIGTERM, then SIGKILL
    after ``kill_grace_s`` seconds. Pod-only settings (image, resources, volumes, scheduling)
    do not apply here.
    """

    def __init__(self, kill_grace_s: float = 10.0):
        self.kill_grace_s = kill_grace_s

    def run(self, job: PretrainJob, timeout_s: float, log: Log) -> None:
        if job.num_nodes != 1:
            raise LaunchError(
                f"the local backend runs on this machine only, so num_nodes must be 1 (got {job.num_nodes}); "
                "use backend 'pytorchjob' for several nodes", reason="InvalidSpec",
            )
        command = local_command(job)
        log(f"launcher: running {shlex.join(command)}")
        process = subprocess.Popen(
            command, env=_child_env(job), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1, start_new_session=True,  # its own process group
        )
        reader = threading.Thread(target=_forward_lines, args=(process, log), name="launcher-local-output", daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s or None)
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"pretraining job {job.name} did not finish within {timeout_s:g} s (timeout); it was stopped",
                reason="Timeout",
            ) from None
        finally:
            if process.poll() is None:
                _stop_group(process, self.kill_grace_s, log)
            reader.join(timeout=5)
        if code != 0:
            raise LaunchError(f"pretraining job {job.name} failed: torchrun exited with code {code}", reason="ExitCode", exit_code=code)
        log(f"launcher: pretraining job {job.name} finished")


def _forward_lines(process: subprocess.Popen, log: Log) -> None:
    for line in process.stdout:
        log(line.rstrip("\n"))


def _stop_group(process: subprocess.Popen, grace_s: float, log: Log) -> None:
    """SIGTERM the child's process group (torchrun and its workers), SIGKILL it after ``grace_s``."""
    log(f"launcher: stopping process group {process.pid}")
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process.pid, signal.SIGKILL)  # workers that outlived torchrun


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


register_backend("local", LocalBackend)
