"""torch.distributed set-up from the launch environment (torchrun, a PyTorchJob, a TrainJob).

One code path serves a single CPU process, ``torchrun --nproc-per-node K`` on gloo, and a
multi-node PyTorchJob on NCCL: every entry point calls :func:`init_distributed`, which
reads the standard environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``) that both torchrun and the Kubeflow Training Operator set, and does nothing
when there is no such environment.

This is the process's set-up, not the method: it reads the environment, meets the other
processes over the network and reports a bad launch as a :class:`ConfigError`, so it lives
beside the other stages' inputs rather than in :mod:`simclr_core.method`, which does no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from simclr_core.config import ConfigError, shown
from simclr_core.method.distributed import DistEnv

__all__ = ["LaunchEnv", "read_launch_env", "init_distributed", "destroy_distributed"]

# Elastic launches (the Training Operator with elasticPolicy, torchrun's own agent) may
# hand the rendezvous over as PET_* variables; the plain name wins where both are set.
_ENV_FALLBACKS = {
    "MASTER_ADDR": "PET_MASTER_ADDR",
    "MASTER_PORT": "PET_MASTER_PORT",
}


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """The torch.distributed variables of this process, parsed once and checked together.

    Attributes:
        world_size: WORLD_SIZE (1 when unset).
        rank: RANK, in [0, world_size).
        local_rank: LOCAL_RANK, >= 0.
        master_addr: MASTER_ADDR (or PET_MASTER_ADDR); "" for a single process.
        master_port: MASTER_PORT (or PET_MASTER_PORT), a TCP port; 0 for a single process.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0


_MAX_WORLD_SIZE = 2**20


def _env_int(name: str, default: int, low: int, high: int) -> int:
    """The variable ``name`` as a plain decimal integer in [low, high]: no sign, no spaces, no '1e3'.

    int() would accept " 3" and "+3", which other readers of the same variable (torch's own
    parsing, a shell test) may not: one strict reading is what every part of a job agrees on.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError(f"environment variable {name}={shown(raw, 40)} is not a plain decimal integer")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"environment variable {name}={raw} is out of range: expected {low} to {high}")
    return value


def read_launch_env() -> LaunchEnv:
    """Parse WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or their PET_* forms).

    Raises:
        ConfigError: naming the variable, when one is malformed, out of range, or missing
            for a job of more than one process.
    """
    world_size = _env_int("WORLD_SIZE", 1, 1, _MAX_WORLD_SIZE)
    rank = _env_int("RANK", 0, 0, _MAX_WORLD_SIZE)
    local_rank = _env_int("LOCAL_RANK", 0, 0, _MAX_WORLD_SIZE)
    if rank >= world_size:
        raise ConfigError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    if world_size == 1:
        return LaunchEnv(local_rank=local_rank)
    addr = os.environ.get("MASTER_ADDR") or os.environ.get(_ENV_FALLBACKS["MASTER_ADDR"], "")
    port_name = "MASTER_PORT" if os.environ.get("MASTER_PORT") else _ENV_FALLBACKS["MASTER_PORT"]
    missing = [name for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", os.environ.get(port_name))) if not value]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set; launch with "
            "torchrun or set the rendezvous variables the Training Operator sets"
        )
    if addr != addr.strip() or any(c.isspace() for c in addr) or len(addr) > 253:
        raise ConfigError(f"environment variable MASTER_ADDR={shown(addr, 60)} is not a host name or address")
    return LaunchEnv(world_size, rank, local_rank, addr, _env_int(port_name, 0, 1, 65535))


def init_distributed(
    backend: str | None = None,
    device: str | None = None,
    timeout_s: float = 1800.0,
) -> DistEnv:
    """Initialise torch.distributed from the environment, or not at all.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, else gloo.
        device: "cpu" or "cuda"; default CUDA when available.
        timeout_s: collective timeout in seconds.

    Returns:
        the :class:`DistEnv` of this process. With ``WORLD_SIZE`` unset or 1 no process
        group is created and the result describes a single process.

    Raises:
        ConfigError (a ValueError): when the environment is inconsistent (rank out of range, missing
            MASTER_ADDR/MASTER_PORT with WORLD_SIZE > 1, NCCL without CUDA).
    """
    launch = read_launch_env()
    world_size, rank, local_rank = launch.world_size, launch.rank, launch.local_rank

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        compute_device = torch.device("cuda", torch.cuda.current_device())
    else:
        compute_device = torch.device("cpu")

    if world_size == 1:
        return DistEnv(0, 1, 0, None, compute_device)

    # env:// reads the plain names; an elastic launch may have set only the PET_* ones
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.master_addr, str(launch.master_port)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=rank,
            timeout=timeout,
            device_id=compute_device if use_cuda else None,
            **_rendezvous(rank, world_size, timeout),
        )
    return DistEnv(rank, world_size, local_rank, backend, compute_device)


def _rendezvous(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """How the process group meets: ``env://``, or, in a torchrun that restarted its workers
    (``--max-restarts``), the same store under a prefix of this attempt. torchrun's workers
    share the agent's store across attempts, so without the prefix a restarted rank can read
    a peer's address from the attempt before and fail to connect ("Connection refused")."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {"init_method": "env://"}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return {"store": dist.PrefixStore(f"simclr/attempt-{attempt}", store)}


def destroy_distributed() -> None:
    """Tear down the process group if one exists (safe to call in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

