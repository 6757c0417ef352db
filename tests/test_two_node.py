"""Two "nodes" run exactly as a two-pod PyTorchJob runs them, on 127.0.0.1.

Each "pod" runs the container command the launcher puts in the PyTorchJob (``torchrun
--no-python simclr pretrain ...``, no node arguments) with the container's env plus the
variables the Training Operator (release 1.9, pkg/controller.v1/pytorch/envvar.go and
master.go) sets in a Master/Worker pod: MASTER_ADDR, MASTER_PORT, PET_MASTER_ADDR,
PET_MASTER_PORT, WORLD_SIZE (= pods x nprocPerNode), RANK and PET_NODE_RANK (the pod's
index, Master 0), PET_NPROC_PER_NODE, PET_NNODES, PYTHONUNBUFFERED. torchrun takes its
rendezvous from the PET_* ones. The result must equal one process on the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.launcher import PretrainJob, build_pytorchjob
from tests.conftest import DIST_VARS, TINY_PRETRAIN, run_cli
from tests.multiproc import free_port
from tests.pods import expand_like_the_kubelet
from tests.test_pretrain_resume import _first_epoch_loss, _weights

# 54 training images and a global batch of 48: the first epoch is exactly one step.
SETTINGS = ["--device", "cpu", *TINY_PRETRAIN, "--epochs", "1", "--batch-size", "48"]


def operator_env(job: dict, replica_type: str, index: int, master_addr: str, master_port: int) -> dict[str, str]:
    """The variables the Training Operator adds to replica ``replica_type``/``index`` of ``job``
    (without elasticPolicy). In a cluster MASTER_ADDR is the Master's Service and the port is
    the container's ``pytorchjob-port``; here both pods share 127.0.0.1 and a free port."""
    spec = job["spec"]
    pods = sum(replica["replicas"] for replica in spec["pytorchReplicaSpecs"].values())
    rank = index if replica_type == "Master" else index + 1
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(master_port),
        "PET_MASTER_PORT": str(master_port),
        "MASTER_ADDR": master_addr,
        "PET_MASTER_ADDR": master_addr,
        "WORLD_SIZE": str(pods * int(spec["nprocPerNode"])),
        "RANK": str(rank),
        "PET_NPROC_PER_NODE": spec["nprocPerNode"],
        "PET_NODE_RANK": str(rank),
        "PET_NNODES": str(pods),
    }


def _start_pod(job: dict, replica_type: str, index: int, port: int, cwd: Path) -> subprocess.Popen:
    container = job["spec"]["pytorchReplicaSpecs"][replica_type]["template"]["spec"]["containers"][0]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("PET_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the image's torchrun and simclr
    env["OMP_NUM_THREADS"] = "1"
    env.update({e["name"]: e["value"] for e in container["env"]})
    env.update(operator_env(job, replica_type, index, "127.0.0.1", port))
    command = [expand_like_the_kubelet(arg, env) for arg in container["command"]]
    command[command.index("--metrics-port") + 1] = str(free_port())  # pods have a network each; here they share one
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.multiproc
def test_two_pytorchjob_pods_give_the_single_process_first_step_loss(tiny_prepared, tmp_path):
    single = run_cli("pretrain", "--data", str(tiny_prepared), "--out", str(tmp_path / "one"), *SETTINGS, cwd=tmp_path)
    assert single.returncode == 0, single.stderr

    job = PretrainJob(name="two-nodes", image="unused", simclr_args=["--data", str(tiny_prepared), "--out", str(tmp_path / "two"), *SETTINGS],
                      num_nodes=2, procs_per_node=1)
    obj = build_pytorchjob(job, "default")
    assert obj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    port = free_port()
    pods = [_start_pod(obj, "Master", 0, port, tmp_path), _start_pod(obj, "Worker", 0, port, tmp_path)]
    outputs = []
    try:
        for pod in pods:
            outputs.append(pod.communicate(timeout=180)[0])
    finally:
        for pod in pods:
            pod.kill()
    for name, pod, output in zip(("master", "worker"), pods, outputs):
        assert pod.returncode == 0, f"{name} failed:\n{output}"
    assert "2 process(es)" in outputs[0]

    assert _first_epoch_loss(tmp_path / "two") == pytest.approx(_first_epoch_loss(tmp_path / "one"), rel=1e-5, abs=1e-5)
    one, two = _weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "two" / "model.pt")
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-4, rtol=1e-4, msg=name)
