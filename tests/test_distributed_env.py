"""init_distributed from the environment: none, torchrun's, and the Training Operator's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from simclr_core.launch import init_distributed
from simclr_core.method.distributed import all_gather_with_grad, get_rank, get_world_size
from tests.multiproc import free_port

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PET_MASTER_ADDR", "PET_MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_environment(clean_env):
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    assert env.device == torch.device("cpu")
    assert get_world_size() == 1 and get_rank() == 0
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x


@pytest.mark.parametrize(
    "variables,match",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ],
)
def test_inconsistent_environment_is_a_clear_error(clean_env, variables, match):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        init_distributed(device="cpu")


def test_cuda_asked_without_cuda_is_a_clear_error(clean_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        init_distributed(device="cuda")


def _run_env_command(extra_env: dict[str, str], launcher: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(extra_env)
    return subprocess.Popen(
        [*launcher, "-m", "simclr_core", "env", "--backend", "gloo", "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.multiproc
def test_training_operator_master_and_worker_environment():
    """A PyTorchJob with a Master and one Worker and no torchrun: the operator sets
    MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK in each pod, and the pods find each other."""
    port = str(free_port())
    pods = [
        _run_env_command({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank)}, [sys.executable])
        for rank in range(2)
    ]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout in _finished(pods)]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in reports] == [(0, 2, "gloo"), (1, 2, "gloo")]


def _finished(pods: list[subprocess.Popen]) -> list[str]:
    """Each pod's stdout once all have exited; a failure shows every pod's stderr (one pod's crash
    reads as "connection closed by peer" in the other's)."""
    outputs = [pod.communicate(timeout=120) for pod in pods]
    failed = [rank for rank, pod in enumerate(pods) if pod.returncode != 0]
    assert not failed, "\n".join(f"--- rank {rank} (exit {pods[rank].returncode}):\n{outputs[rank][1][-3000:]}" for rank in range(len(pods)))
    return [stdout for stdout, _ in outputs]


@pytest.mark.multiproc
def test_elastic_pet_variables_are_accepted():
    port = str(free_port())
    pods = [
        _run_env_command({"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank)}, [sys.executable])
        for rank in range(2)
    ]
    for stdout in _finished(pods):
        assert json.loads(stdout.strip().splitlines()[-1])["world_size"] == 2


@pytest.mark.multiproc
def test_torchrun_two_processes():
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    launcher = subprocess.run(
        [*torchrun, "-m", "simclr_core", "env", "--backend", "gloo", "--device", "cpu"],
        env={k: v for k, v in os.environ.items() if k not in DIST_VARS},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert launcher.returncode == 0, launcher.stderr
    reports = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", launcher.stdout)), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in reports] == [(0, 0, 2), (1, 1, 2)]


def test_cli_usage_error_exit_code(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "5")
    result = subprocess.run([sys.executable, "-m", "simclr_core", "env"], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 2
    assert "RANK" in result.stderr and "Traceback" not in result.stderr
