"""The trainer pod that every cluster backend asks for: command, env, volumes, security, resources.

The PyTorchJob (Training Operator v1) and the TrainJob (Kubeflow Trainer v2) place these
pieces in different fields of their objects, but the pod they describe is the same: the
image's ``simclr`` under ``torchrun``, as the image's non-root user with a read-only root
filesystem, a ``/tmp`` emptyDir, an in-memory ``/dev/shm``, the PVC, one metrics port per
local rank, and with ``stage_size`` an emptyDir that ``simclr pretrain --stage-dir`` copies the
dataset into (once per pod, verified: simclr_core/staging.py).

**Restarts.** ``torchrun --max-restarts R`` with a c10d rendezvous on the operator's master
address (``$(PET_MASTER_ADDR):$(PET_MASTER_PORT)``, which the kubelet expands from the env
both operators set) restarts the workers of every pod when one process fails: its agent
restarts, the other agents see a node waiting at the rendezvous and restart theirs, and the
trainer resumes from the last checkpoint on the PVC. A pod that is lost outright (node loss,
eviction) is replaced by the operator (restartPolicy / backoff); the survivors' collectives
fail after ``pretrain.collective_timeout_s`` and they rejoin.
"""

from __future__ import annotations

from typing import Any

from components.launcher.core import PretrainJob

__all__ = [
    "LABELS", "METRICS_PORT", "SCRAPED_LOCAL_RANKS", "POD_ENV",
    "trainer_command", "metrics_port_name", "metrics_ports", "volumes", "volume_mounts", "env_list",
    "pod_security_context", "container_security_context", "resource_requirements", "queue_labels",
]

# The same labels as manifests/pytorchjob.yaml and trainjob.yaml: the PodMonitor and the
# NetworkPolicy select trainer pods by them.
LABELS = {
    "app.kubernetes.io/name": "simclr-pretrain",
    "app.kubernetes.io/component": "trainer",
    "app.kubernetes.io/managed-by": "simclr-launcher",
}
# The trainer's Prometheus endpoint (`simclr pretrain --metrics-port`). Local rank k of a pod
# serves on METRICS_PORT + k, declared as the container port "metrics" (k = 0) or "metrics-k":
# manifests/podmonitor.yaml scrapes those names for k < SCRAPED_LOCAL_RANKS (a node's GPUs).
METRICS_PORT = 9090
SCRAPED_LOCAL_RANKS = 8
# The root filesystem is read-only; everything that writes caches goes to the /tmp emptyDir.
POD_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "MPLCONFIGDIR": "/tmp/matplotlib", "PYTHONUNBUFFERED": "1"}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PVC_VOLUME = "simclr-data"
STAGE_VOLUME = "stage"


def trainer_command(job: PretrainJob) -> list[str]:
    """``torchrun ... simclr pretrain --metrics-port 9090 [--stage-dir /stage] ARGS`` (an option in
    ``job.simclr_args`` wins: the CLI takes an option's last value). ``--stage-dir`` comes with
    ``job.stage_size``: the staging emptyDir's mount path."""
    staging = ["--stage-dir", job.stage_mount_path] if job.stage_size else []
    return [
        "torchrun", "--no-python", "--max-restarts", str(job.max_restarts),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)", "--rdzv-id", job.name,
        "simclr", "pretrain", "--metrics-port", str(METRICS_PORT), *staging, *job.simclr_args,
    ]


def metrics_port_name(local_rank: int) -> str:
    """The container port name of local rank ``local_rank``'s metrics: "metrics", "metrics-1", ..."""
    return "metrics" if local_rank == 0 else f"metrics-{local_rank}"


def metrics_ports(processes: int) -> list[dict]:
    """One container port per local rank: rank k's /metrics on METRICS_PORT + k."""
    return [
        {"name": metrics_port_name(rank), "containerPort": METRICS_PORT + rank, "protocol": "TCP"}
        for rank in range(processes)
    ]


def volumes(job: PretrainJob) -> list[dict]:
    found: list[dict] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}},
    ]
    if job.pvc_name:
        found.append({"name": PVC_VOLUME, "persistentVolumeClaim": {"claimName": job.pvc_name}})
    if job.stage_size:  # node-local copy of the dataset (the node's disk, or its local SSD where the node pool has one)
        found.append({"name": STAGE_VOLUME, "emptyDir": {"sizeLimit": job.stage_size}})
    return found


def volume_mounts(job: PretrainJob) -> list[dict]:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if job.pvc_name:
        mounts.append({"name": PVC_VOLUME, "mountPath": job.pvc_mount_path})
    if job.stage_size:
        mounts.append({"name": STAGE_VOLUME, "mountPath": job.stage_mount_path})
    return mounts


def env_list(job: PretrainJob) -> list[dict]:
    return [{"name": name, "value": str(value)} for name, value in {**POD_ENV, **job.env}.items()]


def pod_security_context(job: PretrainJob) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": job.run_as_user,
        "runAsGroup": job.run_as_user,
        "fsGroup": job.run_as_user,  # the PVC is writable by that group where the driver applies it
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(job: PretrainJob) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": job.run_as_user,
        "runAsGroup": job.run_as_user,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resource_requirements(job: PretrainJob) -> dict:
    requests = {key: value for key, value in (("cpu", job.cpu_request), ("memory", job.memory_request)) if value}
    limits = {key: value for key, value in (("cpu", job.cpu_limit), ("memory", job.memory_limit)) if value}
    if job.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(job.gpus_per_node)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def queue_labels(job: PretrainJob) -> dict[str, str]:
    """Kueue's queue label, when the job names a LocalQueue (Kueue admits the whole job at once)."""
    return {KUEUE_QUEUE_LABEL: job.queue_name} if job.queue_name else {}
