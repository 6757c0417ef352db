"""The "trainjob" backend: a Kubeflow Trainer v2 TrainJob (``trainer.kubeflow.org/v1alpha1``).

Built against Trainer v2.3.0's CRD (../shared/schemas): a TrainJob references a runtime
(default the ClusterTrainingRuntime ``torch-distributed``, whose trainer container is ``node``
and which sets the ``PET_*`` variables torchrun reads) and overrides its trainer: the image,
the trainer command of :mod:`components.launcher.podspec`, ``numNodes``, ``numProcPerNode``
and ``resourcesPerNode``. What the trainer field cannot say (the PVC, the service account,
security contexts, scheduling, pull secrets) goes through v2.3.0's ``runtimePatches``: a patch
of the runtime's JobSet template, owned by this launcher (``manager``), on the replicated job
``node``.

Trainer v2 runs the TrainJob as a JobSet of the same name; rank 0's pod is the ``node`` job's
completion index 0, whose log is streamed. The outcome is the TrainJob's ``Complete`` or
``Failed`` condition. v2.3.0's pod patch has no ``priorityClassName`` and no container
``ports``: a priority class belongs in the runtime (or Kueue's workload priority), and the
metrics ports are not declared (the trainer serves them all the same).
"""

from __future__ import annotations

import math
from typing import Any

from components.launcher import podspec
from components.launcher.core import PretrainJob, register_backend
from components.launcher.kube import DEADLINE_MARGIN_S, ClusterJobBackend, JobOutcome, JobResource, condition_outcome

__all__ = ["GROUP", "VERSION", "PLURAL", "KIND", "CONTAINER_NAME", "TRAINJOB", "PATCH_MANAGER", "build_trainjob", "TrainJobBackend"]

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
CONTAINER_NAME = "node"  # the trainer container and replicated job of the torch runtimes
PATCH_MANAGER = "simclr-kubeflow/launcher"  # who owns the runtime patch (one entry per manager)
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

TRAINJOB = JobResource(
    GROUP, VERSION, PLURAL, KIND, CONTAINER_NAME,
    lead_pod_labels=lambda name: {JOBSET_NAME_LABEL: name, REPLICATED_JOB_LABEL: CONTAINER_NAME, COMPLETION_INDEX_LABEL: "0"},
    hints={
        403: "; the service account needs RBAC in this namespace to create, get, list, watch and delete "
             "trainjobs.trainer.kubeflow.org, to get and list pods, and to get pods/log",
        404: "; is Kubeflow Trainer v2 (TrainJob, trainer.kubeflow.org/v1alpha1) installed in this cluster?",
    },
)


def build_trainjob(job: PretrainJob, namespace: str, owner_reference: dict | None = None, timeout_s: float = 0) -> dict:
    """The TrainJob for ``job`` in ``namespace``, as the dict the API server accepts.

    Raises:
        ValueError: ``job.priority_class`` is set (v2.3.0's pod patch cannot carry it).
    """
    if job.priority_class:
        raise ValueError(
            f"priority_class {job.priority_class!r}: a TrainJob (Trainer v2.3.0) cannot set its pods' priorityClassName; "
            "set it in the training runtime, or give the job a Kueue queue_name and use Kueue's workload priority"
        )
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": job.runtime_kind, "name": job.runtime_name},
        "trainer": {
            "image": job.image,
            "command": podspec.trainer_command(job),
            "env": podspec.env_list(job),
            "numNodes": job.num_nodes,
            "numProcPerNode": job.processes_per_node,
            "resourcesPerNode": podspec.resource_requirements(job),
        },
        "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": CONTAINER_NAME, "template": {"spec": {"template": _pod_template_patch(job)}}},
        ]}}}}],
    }
    if timeout_s > 0:
        spec["activeDeadlineSeconds"] = math.ceil(timeout_s) + DEADLINE_MARGIN_S
    metadata: dict[str, Any] = {"name": job.name, "namespace": namespace, "labels": {**podspec.LABELS, **podspec.queue_labels(job)}}
    if owner_reference:
        metadata["ownerReferences"] = [owner_reference]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata, "spec": spec}


def _pod_template_patch(job: PretrainJob) -> dict:
    spec: dict[str, Any] = {
        "securityContext": podspec.pod_security_context(job),
        "volumes": podspec.volumes(job),
        "containers": [{
            "name": CONTAINER_NAME,
            "volumeMounts": podspec.volume_mounts(job),
            "securityContext": podspec.container_security_context(job),
        }],
    }
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in job.tolerations]
    if job.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in job.image_pull_secrets]
    # Istio sidecars keep a finished pod running and get in the way of the rendezvous.
    metadata = {"labels": dict(podspec.LABELS), "annotations": {"sidecar.istio.io/inject": "false"}}
    return {"metadata": metadata, "spec": spec}


class TrainJobBackend(ClusterJobBackend):
    """Runs a :class:`PretrainJob` as a TrainJob and waits for it (see :class:`ClusterJobBackend`)."""

    resource = TRAINJOB

    def build(self, job: PretrainJob, namespace: str, owner_reference: dict | None, timeout_s: float) -> dict:
        return build_trainjob(job, namespace, owner_reference, timeout_s)

    def outcome(self, obj: dict) -> JobOutcome | None:
        return condition_outcome(obj, "Complete", "Failed")

    def describe(self, body: dict) -> str:
        trainer, runtime = body["spec"]["trainer"], body["spec"]["runtimeRef"]
        return f"{trainer['numNodes']} node(s) x {trainer['numProcPerNode']} process(es), runtime {runtime['kind']} {runtime['name']}"


register_backend("trainjob", TrainJobBackend)
