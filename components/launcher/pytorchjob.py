"""The "pytorchjob" backend: a Kubeflow Training Operator PyTorchJob (``kubeflow.org/v1``).

:func:`build_pytorchjob` turns a :class:`PretrainJob` into the PyTorchJob object (a plain
dict): a Master and ``num_nodes - 1`` Workers, each pod running the trainer command of
:mod:`components.launcher.podspec` (``torchrun ... simclr pretrain --metrics-port 9090 ARGS``)
in a container named ``pytorch``. torchrun reads the operator's PET_NNODES and
PET_NPROC_PER_NODE and meets the other pods at PET_MASTER_ADDR:PET_MASTER_PORT (c10d), so the
command is the same on every pod. Pods restart on failure (``restartPolicy: OnFailure``), and
the trainer resumes from the newest good checkpoint under the run's ``checkpoints/``.

:class:`PyTorchJobBackend` runs it through the cycle of :class:`~components.launcher.kube.ClusterJobBackend`,
streaming the Master pod's log.
"""

from __future__ import annotations

import math
from typing import Any

from components.launcher import podspec
from components.launcher.core import PretrainJob, register_backend
from components.launcher.kube import (
    API_TIMEOUT_S,
    DEADLINE_MARGIN_S,
    ClusterJobBackend,
    JobOutcome,
    JobResource,
    condition_outcome,
    load_api_client,
    resolve_namespace,
)
from components.launcher.podspec import METRICS_PORT, SCRAPED_LOCAL_RANKS, metrics_port_name, metrics_ports

__all__ = [
    "GROUP", "VERSION", "PLURAL", "KIND", "CONTAINER_NAME", "PYTORCHJOB",
    "build_pytorchjob", "container_command", "job_outcome", "JobOutcome",
    "load_api_client", "resolve_namespace", "PyTorchJobBackend",
    "API_TIMEOUT_S", "METRICS_PORT", "SCRAPED_LOCAL_RANKS", "metrics_port_name", "metrics_ports",
]

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator finds its container (and port) by this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults, stated explicitly
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# Finished pods stay (for their logs) until the launcher deletes the job; running ones go.
CLEAN_POD_POLICY = "Running"

PYTORCHJOB = JobResource(
    GROUP, VERSION, PLURAL, KIND, CONTAINER_NAME,
    lead_pod_labels=lambda name: {JOB_NAME_LABEL: name, REPLICA_TYPE_LABEL: "master"},
    hints={
        403: "; the service account needs RBAC in this namespace to create, get, list, watch and delete "
             "pytorchjobs.kubeflow.org, to get and list pods, and to get pods/log",
        404: "; is the Kubeflow Training Operator (PyTorchJob, kubeflow.org/v1) installed in this cluster?",
    },
)

container_command = podspec.trainer_command


def build_pytorchjob(job: PretrainJob, namespace: str, owner_reference: dict | None = None, timeout_s: float = 0) -> dict:
    """The PyTorchJob for ``job`` in ``namespace``, as the dict the API server accepts.

    Args:
        job: what to run.
        namespace: the job's namespace.
        owner_reference: an ownerReferences entry (the launching pod), or None.
        timeout_s: when > 0, ``runPolicy.activeDeadlineSeconds`` is this plus a margin.
    """
    replicas = {"Master": _replica_spec(job, 1)}
    if job.num_nodes > 1:
        replicas["Worker"] = _replica_spec(job, job.num_nodes - 1)
    run_policy: dict[str, Any] = {"backoffLimit": job.backoff_limit, "cleanPodPolicy": CLEAN_POD_POLICY}
    if timeout_s > 0:
        run_policy["activeDeadlineSeconds"] = math.ceil(timeout_s) + DEADLINE_MARGIN_S
    if job.priority_class:  # the PodGroup's priority under a gang scheduler (the pods carry it too)
        run_policy["schedulingPolicy"] = {"priorityClass": job.priority_class}
    metadata: dict[str, Any] = {"name": job.name, "namespace": namespace, "labels": {**podspec.LABELS, **podspec.queue_labels(job)}}
    if owner_reference:
        metadata["ownerReferences"] = [owner_reference]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {"nprocPerNode": str(job.processes_per_node), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


def _replica_spec(job: PretrainJob, replicas: int) -> dict:
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {
            # Istio sidecars keep a finished pod running and get in the way of the rendezvous.
            "metadata": {"labels": dict(podspec.LABELS), "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": _pod_spec(job),
        },
    }


def _pod_spec(job: PretrainJob) -> dict:
    spec: dict[str, Any] = {
        "containers": [_container(job)],
        "volumes": podspec.volumes(job),
        "automountServiceAccountToken": False,  # training never talks to the API server
        "securityContext": podspec.pod_security_context(job),
    }
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in job.tolerations]
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.priority_class:
        spec["priorityClassName"] = job.priority_class
    if job.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in job.image_pull_secrets]
    return spec


def _container(job: PretrainJob) -> dict:
    return {
        "name": CONTAINER_NAME,
        "image": job.image,
        "imagePullPolicy": "Always",
        "command": podspec.trainer_command(job),
        "env": podspec.env_list(job),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}, *metrics_ports(job.processes_per_node)],
        "resources": podspec.resource_requirements(job),
        "volumeMounts": podspec.volume_mounts(job),
        "securityContext": podspec.container_security_context(job),
    }


def job_outcome(obj: dict) -> JobOutcome | None:
    """The outcome of a PyTorchJob object (its Succeeded or Failed condition), or None while it runs."""
    return condition_outcome(obj, "Succeeded", "Failed")


class PyTorchJobBackend(ClusterJobBackend):
    """Runs a :class:`PretrainJob` as a PyTorchJob and waits for it (see :class:`ClusterJobBackend`)."""

    resource = PYTORCHJOB

    def build(self, job: PretrainJob, namespace: str, owner_reference: dict | None, timeout_s: float) -> dict:
        return build_pytorchjob(job, namespace, owner_reference, timeout_s)

    def outcome(self, obj: dict) -> JobOutcome | None:
        return job_outcome(obj)

    def describe(self, body: dict) -> str:
        nodes = body["spec"]["pytorchReplicaSpecs"]
        return f"1 master + {nodes.get('Worker', {}).get('replicas', 0)} worker(s), {body['spec']['nprocPerNode']} process(es) each"


register_backend("pytorchjob", PyTorchJobBackend)
