"""Run ``simclr pretrain`` on this machine (torchrun) or on a cluster (a Kubeflow Training
Operator PyTorchJob, or a Kubeflow Trainer v2 TrainJob).

::

    from components.launcher import PretrainJob, job_name_for, launch

    job = PretrainJob(
        name=job_name_for(run_id), image="ghcr.io/me/simclr:0.1.0",
        simclr_args=["--data", "/mnt/simclr/data", "--out", "/mnt/simclr/run", "--epochs", "4"],
        num_nodes=2, procs_per_node=4, gpus_per_node=4, pvc_name="simclr-data",
    )
    launch(job, backend="pytorchjob", timeout_s=6 * 3600)   # or "trainjob", or "local"

A backend is anything with ``run(job, timeout_s, log)`` (:class:`TrainingBackend`);
:func:`register_backend` adds one under a name. The cluster backends share one cycle
(kube.py) and one trainer pod (podspec.py). This package imports the kubernetes client;
``simclr_core`` does not.
"""

from components.launcher.core import (
    MAX_JOB_NAME_LENGTH,
    LaunchError,
    PretrainJob,
    TrainingBackend,
    backend_names,
    get_backend,
    job_name_for,
    launch,
    register_backend,
)
from components.launcher.local import LocalBackend, local_command
from components.launcher.pytorchjob import PyTorchJobBackend, build_pytorchjob, container_command, load_api_client
from components.launcher.trainjob import TrainJobBackend, build_trainjob
from components.launcher.run_identity import pipeline_run_id
from components.launcher.volume import collect_from_volume, stage_on_volume

__all__ = [
    "PretrainJob",
    "LaunchError",
    "TrainingBackend",
    "launch",
    "job_name_for",
    "register_backend",
    "get_backend",
    "backend_names",
    "MAX_JOB_NAME_LENGTH",
    "LocalBackend",
    "local_command",
    "PyTorchJobBackend",
    "build_pytorchjob",
    "container_command",
    "load_api_client",
    "TrainJobBackend",
    "build_trainjob",
    "pipeline_run_id",
    "stage_on_volume",
    "collect_from_volume",
]
