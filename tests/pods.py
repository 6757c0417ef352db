"""Run a trainer container's command on this machine the way a PyTorchJob pod runs it.

The Training Operator and Trainer v2 start the container's ``command`` (+ ``args``, with
``$(NAME)`` expanded from the env as the kubelet does) with the container's ``env`` and their
own rendezvous variables (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT for torchrun; MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK),
with the PVC mounted at its mount path. Here the mount path is a local directory (the
command's paths are rewritten onto it) and the image's PATH is this venv's bin/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]


def expand_like_the_kubelet(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of ``$(NAME)`` in a command from the container's env (a name
    that is not set stays as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda match: env.get(match.group(1), match.group(0)), text)


def run_like_a_pod(
    container: dict, procs_per_node: int, mounts: dict[str, Path], extra_args: list[str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``container`` (a pod spec's container dict) as one node of a one-node job.

    ``mounts`` maps mount paths to local directories; ``extra_args`` go after the command's
    own arguments (``simclr`` takes the last value of an option: settings small enough for a test).
    """

    def local(text: str) -> str:
        """A path under a mount path, rewritten onto its local directory (once, longest mount first)."""
        for mount_path in sorted(mounts, key=len, reverse=True):
            if text == mount_path or text.startswith(mount_path.rstrip("/") + "/"):
                return str(mounts[mount_path]) + text[len(mount_path):]
        return text

    port = str(free_port())
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        **{item["name"]: local(str(item["value"])) for item in container.get("env", []) if "value" in item},
        "PET_NNODES": "1", "PET_NPROC_PER_NODE": str(procs_per_node), "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port,
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "1", "RANK": "0",
    }
    argv = [expand_like_the_kubelet(local(arg), env) for arg in [*container["command"], *container.get("args", [])]] + extra_args
    # in an empty working directory, as the image's /workspace: the pod has no params.yaml to read
    with tempfile.TemporaryDirectory(prefix="pod-workdir-") as workdir:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=workdir)
