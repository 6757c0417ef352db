"""Which pipeline run this step belongs to, read from the step's own pod.

The pretrain step names its PyTorchJob and its directory on the PVC after the run, so that a
retried step resumes the run's checkpoints and two runs never share a job or a directory. The
run id must not be a task input: KFP's cache key includes every resolved input, so an input
that differs from run to run would defeat caching. ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` is
also filled in only from KFP backend 2.5.0 (earlier ones pass the literal placeholder).

Every KFP 2.x backend runs a step as an Argo Workflows pod, and Argo labels each pod with its
workflow's name (``workflows.argoproj.io/workflow``), one workflow per run; KFP's API server
also labels the pods ``pipeline/runid`` with the run's UUID. KFP's launcher gives the user
container ``KFP_POD_NAME`` (the downward API), so the step reads its pod and takes the first of
those labels. Reading the pod needs ``get`` on pods, which a profile's ``default-editor`` has.
"""

from __future__ import annotations

import os

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from components.launcher.core import Log
from components.launcher.kube import API_TIMEOUT_S, load_api_client, own_pod_name, resolve_namespace

__all__ = ["RUN_ID_ENV", "RUN_ID_LABELS", "pipeline_run_id"]

RUN_ID_ENV = "SIMCLR_RUN_ID"  # set by hand to name a run (outside KFP, or to resume another run's directory)
# In order of preference: the KFP run's UUID, then the Argo workflow's name (unique per run).
RUN_ID_LABELS = ("pipeline/runid", "workflows.argoproj.io/workflow")


def pipeline_run_id(api_client: client.ApiClient | None = None, log: Log = print) -> str:
    """The id of the run this step's pod belongs to, or "" outside a cluster.

    ``$SIMCLR_RUN_ID`` wins. In a pod, the pod's ``pipeline/runid`` or
    ``workflows.argoproj.io/workflow`` label. When the pod cannot be read (no permission, the
    API is down) or has neither label, the pod's own name, with a warning in ``log``: runs still
    never collide, but a retried step starts its pretraining again instead of resuming.
    """
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    pod_name = own_pod_name()
    if not pod_name:
        return ""  # not in a pod
    labels = _pod_labels(api_client, pod_name, log)
    for key in RUN_ID_LABELS:
        if labels.get(key):
            return labels[key]
    log(f"launcher: warning: pod {pod_name} carries none of the labels {', '.join(RUN_ID_LABELS)}; "
        "naming the job after the pod, so a retried step will not resume this attempt's checkpoints")
    return pod_name


def _pod_labels(api_client: client.ApiClient | None, pod_name: str, log: Log) -> dict[str, str]:
    if not pod_name:
        return {}
    namespace = resolve_namespace("")
    try:
        core = client.CoreV1Api(api_client or load_api_client())
        pod = core.read_namespaced_pod(pod_name, namespace, _request_timeout=API_TIMEOUT_S)
    except (ApiException, urllib3.exceptions.HTTPError) as error:
        log(f"launcher: warning: cannot read pod {namespace}/{pod_name} to find its run "
            f"({getattr(error, 'status', '')} {getattr(error, 'reason', error)}); the account needs 'get' on pods")
        return {}
    return dict(pod.metadata.labels or {})
