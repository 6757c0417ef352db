"""The "pytorchjob" backend: a Kubeflow Training Operator PyTorchJob (``kubeflow.org/v1``).

:func:`build_pytorchjob` turns a :class:`PretrainJob` into the PyTorchJob object (a plain
dict): a Master and ``num_nodes - 1`` Workers, each pod running
``torchrun --no-python simclr pretrain --metrics-port 9090 ARGS`` in a container named
``pytorch`` (local rank k serves on 9090 + k, the container port ``metrics`` or ``metrics-k``
that the PodMonitor scrapes). torchrun
reads the rendezvous from the variables the operator sets in every pod (PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), so the command is the
same on every pod. Pods restart on failure (``restartPolicy: OnFailure``) and the trainer
resumes from the newest good checkpoint under the run's ``checkpoints/``.

:class:`PyTorchJobBackend` creates the job, watches it until its Succeeded or Failed
condition (or the timeout), streams the Master pod's log meanwhile, and deletes the job
however the wait ends. The job's ownerReference names the launching pod, so Kubernetes'
garbage collector removes the job even if the launcher is killed outright.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from components.launcher.core import LaunchError, Log, PretrainJob, register_backend

__all__ = [
    "GROUP", "VERSION", "PLURAL", "KIND", "CONTAINER_NAME",
    "build_pytorchjob", "container_command", "job_outcome", "JobOutcome",
    "load_api_client", "resolve_namespace", "PyTorchJobBackend",
]

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator finds its container (and port) by this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults, stated explicitly
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The same labels as manifests/pytorchjob.yaml: the PodMonitor and the NetworkPolicy select
# trainer pods by them.
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
# Finished pods stay (for their logs) until the launcher deletes the job; running ones go.
CLEAN_POD_POLICY = "Running"
# The server-side deadline outlasts the launcher's own timeout by this much, so the
# launcher reports the timeout itself; the deadline only matters if the launcher vanished.
DEADLINE_MARGIN_S = 120
API_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------------ the object


def container_command(job: PretrainJob) -> list[str]:
    """The command of every pod's ``pytorch`` container (a ``--metrics-port`` in ``job.simclr_args`` wins)."""
    return ["torchrun", "--no-python", "simclr", "pretrain", "--metrics-port", str(METRICS_PORT), *job.simclr_args]


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
    metadata: dict[str, Any] = {"name": job.name, "namespace": namespace, "labels": dict(LABELS)}
    if owner_reference:
        metadata["ownerReferences"] = [owner_reference]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {"nprocPerNode": str(job.procs_per_node), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


def _replica_spec(job: PretrainJob, replicas: int) -> dict:
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {
            # Istio sidecars keep a finished pod running and get in the way of the rendezvous.
            "metadata": {"labels": dict(LABELS), "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": _pod_spec(job),
        },
    }


def _pod_spec(job: PretrainJob) -> dict:
    volumes: list[dict] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}},
    ]
    if job.pvc_name:
        volumes.append({"name": "simclr-data", "persistentVolumeClaim": {"claimName": job.pvc_name}})
    spec: dict[str, Any] = {
        "containers": [_container(job)],
        "volumes": volumes,
        "automountServiceAccountToken": False,  # training never talks to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": job.run_as_user,
            "runAsGroup": job.run_as_user,
            "fsGroup": job.run_as_user,  # the PVC is writable by that group
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in job.tolerations]
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    return spec


def _container(job: PretrainJob) -> dict:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if job.pvc_name:
        mounts.append({"name": "simclr-data", "mountPath": job.pvc_mount_path})
    env = {**POD_ENV, **job.env}
    return {
        "name": CONTAINER_NAME,
        "image": job.image,
        "imagePullPolicy": "Always",
        "command": container_command(job),
        "env": [{"name": name, "value": str(value)} for name, value in env.items()],
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}, *metrics_ports(job.procs_per_node)],
        "resources": _resources(job),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": job.run_as_user,
            "runAsGroup": job.run_as_user,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def metrics_port_name(local_rank: int) -> str:
    """The container port name of local rank ``local_rank``'s metrics: "metrics", "metrics-1", ..."""
    return "metrics" if local_rank == 0 else f"metrics-{local_rank}"


def metrics_ports(procs_per_node: int) -> list[dict]:
    """One container port per local rank: rank k's /metrics on METRICS_PORT + k."""
    return [
        {"name": metrics_port_name(rank), "containerPort": METRICS_PORT + rank, "protocol": "TCP"}
        for rank in range(procs_per_node)
    ]


def _resources(job: PretrainJob) -> dict:
    requests = {key: value for key, value in (("cpu", job.cpu_request), ("memory", job.memory_request)) if value}
    limits = {key: value for key, value in (("cpu", job.cpu_limit), ("memory", job.memory_limit)) if value}
    if job.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(job.gpus_per_node)
    resources = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


# ------------------------------------------------------------------------------ its state


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """How a finished PyTorchJob ended: its Succeeded or Failed condition."""

    succeeded: bool
    reason: str
    message: str


def job_outcome(obj: dict) -> JobOutcome | None:
    """The outcome of a PyTorchJob object, or None while it is still going."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Succeeded", "Failed"):
            return JobOutcome(condition["type"] == "Succeeded", condition.get("reason", ""), condition.get("message", ""))
    return None


def _latest_condition(obj: dict) -> str:
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return ""
    last = conditions[-1]
    return f"{last.get('type', '')}: {last.get('message') or last.get('reason') or ''}".rstrip(": ")


# ------------------------------------------------------------------------------ the cluster


def load_api_client() -> client.ApiClient:
    """An API client from the in-cluster service account, else from ~/.kube/config (KUBECONFIG)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=_kubeconfig(), client_configuration=configuration)
        except (config.ConfigException, OSError) as error:
            raise LaunchError(
                f"no Kubernetes configuration: not in a cluster and no usable kubeconfig ({error})", reason="NoConfig"
            ) from error
    return client.ApiClient(configuration)


def _kubeconfig() -> str | None:
    """$KUBECONFIG as it is now (the kubernetes package reads it once, at import)."""
    return os.environ.get("KUBECONFIG") or None


def resolve_namespace(namespace: str) -> str:
    """``namespace``, else this pod's namespace (its service account's), else the kubeconfig's
    current context's namespace, else "default"."""
    if namespace:
        return namespace
    if SERVICEACCOUNT_NAMESPACE.is_file():
        return SERVICEACCOUNT_NAMESPACE.read_text().strip() or "default"
    try:
        _, current = config.list_kube_config_contexts(config_file=_kubeconfig())
        return (current or {}).get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError):
        return "default"


def _default_owner_pod() -> str:
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return ""  # not in a pod: nothing owns the job
    return os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME", "")


class PyTorchJobBackend:
    """Runs a :class:`PretrainJob` as a PyTorchJob and waits for it.

    Args:
        api_client: the Kubernetes API client; default :func:`load_api_client` at run time.
        watch_timeout_s: each watch request lasts at most this long before it is renewed.
        log_poll_s: how often to look for the Master pod (and reconnect to its log).
        log_grace_s: after the job finished, how long the rest of the Master's log may take.
    """

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        watch_timeout_s: float = 60.0,
        log_poll_s: float = 5.0,
        log_grace_s: float = 10.0,
    ):
        self.api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.log_poll_s = log_poll_s
        self.log_grace_s = log_grace_s

    def run(self, job: PretrainJob, timeout_s: float, log: Log) -> None:
        api_client = self.api_client or load_api_client()
        custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
        namespace = resolve_namespace(job.namespace)
        owner = self.owner_reference(core, job.owner_pod or _default_owner_pod(), namespace, log)
        body = build_pytorchjob(job, namespace, owner, timeout_s)
        follower = _MasterLogFollower(core, namespace, job.name, log, self.log_poll_s)
        created = False
        try:
            self._create(custom, body, log)
            created = True
            follower.start()
            outcome = self._wait(custom, namespace, job.name, timeout_s, log)
            follower.stop(self.log_grace_s)  # the end of the log may still be on its way
        finally:
            follower.stop(0)
            if created:
                self._delete(custom, namespace, job.name, log)
        if not outcome.succeeded:
            raise LaunchError(
                f"PyTorchJob {namespace}/{job.name} failed: {outcome.reason or 'no reason given'}: {outcome.message}".rstrip(": "),
                reason=outcome.reason or "Failed",
            )
        log(f"launcher: PyTorchJob {namespace}/{job.name} succeeded")

    # -------------------------------------------------------------- steps

    @staticmethod
    def owner_reference(core: client.CoreV1Api, pod_name: str, namespace: str, log: Log) -> dict | None:
        """The ownerReferences entry for ``pod_name`` in ``namespace``, or None (with a warning
        in ``log``) when there is no such pod or it cannot be read. KFP gives its pods their
        own uid as KFP_POD_UID, which saves the API call."""
        if not pod_name:
            return None
        uid = os.environ.get("KFP_POD_UID", "") if pod_name == os.environ.get("KFP_POD_NAME") else ""
        if not uid:
            try:
                uid = core.read_namespaced_pod(pod_name, namespace, _request_timeout=API_TIMEOUT_S).metadata.uid
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                log(f"launcher: warning: cannot read pod {namespace}/{pod_name} to own the job "
                    f"({getattr(error, 'status', '')} {getattr(error, 'reason', error)}); "
                    "the job will be deleted by the launcher only, not by garbage collection")
                return None
        return {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid}

    def _create(self, custom: client.CustomObjectsApi, body: dict, log: Log) -> None:
        """Create the job. A job of the same name (a retried step, a launcher that was killed)
        is deleted first: the new one resumes from the checkpoint the old one left."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        for attempt in range(2):
            try:
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, _request_timeout=API_TIMEOUT_S)
                break
            except urllib3.exceptions.HTTPError as error:
                raise LaunchError(f"cannot reach the Kubernetes API to create PyTorchJob {namespace}/{name}: {error}", reason="ApiError") from error
            except ApiException as error:
                if error.status != 409 or attempt:
                    raise LaunchError(
                        f"cannot create PyTorchJob {namespace}/{name}: {error.status} {error.reason}: {_api_message(error)}"
                        f"{_CREATE_HINTS.get(error.status, '')}",
                        reason="Conflict" if error.status == 409 else "ApiError",
                    ) from error
                log(f"launcher: a PyTorchJob {namespace}/{name} exists already; replacing it")
                self._delete(custom, namespace, name, log)
                self._wait_gone(custom, namespace, name)
        nodes = body["spec"]["pytorchReplicaSpecs"]
        log(f"launcher: created PyTorchJob {namespace}/{name}: 1 master + {nodes.get('Worker', {}).get('replicas', 0)} "
            f"worker(s), {body['spec']['nprocPerNode']} process(es) each")

    def _wait_gone(self, custom: client.CustomObjectsApi, namespace: str, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=API_TIMEOUT_S)
            except ApiException as error:
                if error.status == 404:
                    return
            except urllib3.exceptions.HTTPError:
                pass  # ask again
            time.sleep(1.0)
        raise LaunchError(f"the old PyTorchJob {namespace}/{name} was not deleted within {timeout_s:g} s", reason="Conflict")

    def _wait(self, custom: client.CustomObjectsApi, namespace: str, name: str, timeout_s: float, log: Log) -> JobOutcome:
        """Wait for the job's Succeeded or Failed condition; raise LaunchError on timeout, when
        the job is deleted by someone else, or when the API refuses to let us watch it.
        The watch runs in a thread, so that this (main) thread keeps the deadline and stays
        responsive to SIGTERM whatever the connection does."""
        watcher = _JobWatcher(custom, namespace, name, log, self.watch_timeout_s)
        watcher.start()
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        try:
            while not watcher.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:g} s (timeout); it was deleted",
                        reason="Timeout",
                    )
        finally:
            watcher.stop()
        if watcher.error is not None:
            raise watcher.error
        return watcher.outcome

    @staticmethod
    def _delete(custom: client.CustomObjectsApi, namespace: str, name: str, log: Log) -> None:
        """Delete the job and, in the background, its pods. Never raises: it runs on the way out
        of failures that matter more."""
        try:
            custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name,
                body=client.V1DeleteOptions(propagation_policy="Background"), _request_timeout=API_TIMEOUT_S,
            )
            log(f"launcher: deleted PyTorchJob {namespace}/{name}")
        except ApiException as error:
            if error.status != 404:
                log(f"launcher: warning: cannot delete PyTorchJob {namespace}/{name}: {error.status} {error.reason}")
        except urllib3.exceptions.HTTPError as error:
            log(f"launcher: warning: cannot delete PyTorchJob {namespace}/{name}: {error}")


_CREATE_HINTS = {
    403: "; the service account needs RBAC in this namespace to create, get, list, watch and delete "
         "pytorchjobs.kubeflow.org, to get and list pods, and to get pods/log",
    404: "; is the Kubeflow Training Operator (PyTorchJob, kubeflow.org/v1) installed in this cluster?",
}


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(error.body or "")[:500]


# ------------------------------------------------------------------------------ the watch


class _JobWatcher(threading.Thread):
    """Watches one PyTorchJob until it has an outcome (``outcome``) or cannot be watched
    (``error``), then sets ``done``. Each watch starts with the job's current state (the API
    server's initial ADDED event) and lasts ``renew_s`` seconds; a dropped connection, an
    expired watch (410) or an unavailable API server (5xx) just start the next one."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str, name: str, log: Log, renew_s: float):
        super().__init__(name=f"launcher-watch-{name}", daemon=True)
        self.custom, self.namespace, self.name, self.log, self.renew_s = custom, namespace, name, log, renew_s
        self.done = threading.Event()
        self.outcome: JobOutcome | None = None
        self.error: LaunchError | None = None
        self._stopping = threading.Event()
        self._shown = ""

    def stop(self) -> None:
        """Ask the thread to end. It does at its next event or renewal (the job's deletion is
        one); closing its response from here would block until its read returns."""
        self._stopping.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set() and not self.done.is_set():
                try:
                    self._watch_once()
                except (urllib3.exceptions.HTTPError, OSError):
                    pass  # the connection dropped or went quiet: watch again
                except ApiException as error:
                    if error.status not in (410, 429) and (error.status or 0) < 500:
                        self._finish(error=LaunchError(
                            f"cannot watch PyTorchJob {self.namespace}/{self.name}: {error.status} {error.reason}", reason="ApiError"))
                    elif self._stopping.wait(1.0):
                        return
        except Exception as error:  # anything unforeseen ends the wait rather than hanging it
            self._finish(error=LaunchError(f"watching PyTorchJob {self.namespace}/{self.name} failed: {error!r}", reason="ApiError"))

    def _watch_once(self) -> None:
        # watch="true" as kubectl sends it (the client's Watch helper sends "True").
        response = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, field_selector=f"metadata.name={self.name}", watch="true",
            timeout_seconds=max(1, math.ceil(self.renew_s)), _preload_content=False,
            _request_timeout=(API_TIMEOUT_S, self.renew_s + API_TIMEOUT_S),
        )
        seen = False
        try:
            for line in iter_resp_lines(response):
                event = json.loads(line)
                seen = seen or (event.get("object") or {}).get("metadata", {}).get("name") == self.name
                if self._stopping.is_set() or self._handle(event):
                    return
        finally:
            response.close()
        if not seen:  # a watch starts with an ADDED event for the job if it exists
            self._finish(error=LaunchError(f"PyTorchJob {self.namespace}/{self.name} no longer exists", reason="Deleted"))

    def _handle(self, event: dict) -> bool:
        """Act on one watch event; True when the wait is over."""
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason', '')}: {obj.get('message', '')}")
        if (obj.get("metadata") or {}).get("name") != self.name:
            return False  # a server that ignores the field selector
        if event.get("type") == "DELETED":
            self._finish(error=LaunchError(f"PyTorchJob {self.namespace}/{self.name} was deleted before it finished", reason="Deleted"))
            return True
        state = _latest_condition(obj)
        if state and state != self._shown:
            self.log(f"launcher: PyTorchJob {self.namespace}/{self.name}: {state}")
            self._shown = state
        outcome = job_outcome(obj)
        if outcome is not None:
            self._finish(outcome=outcome)
        return outcome is not None

    def _finish(self, outcome: JobOutcome | None = None, error: LaunchError | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


# ------------------------------------------------------------------------------ the log


class _MasterLogFollower(threading.Thread):
    """Streams the Master pod's ``pytorch`` container log into ``log`` until stopped.

    It waits for the pod to exist and start, follows its log, and reconnects when the stream
    ends (a restarted container, a dropped connection), skipping lines it has already passed
    on (each line carries the kubelet's timestamp).
    """

    def __init__(self, core: client.CoreV1Api, namespace: str, job_name: str, log: Log, poll_s: float):
        super().__init__(name=f"launcher-log-{job_name}", daemon=True)
        self.core, self.namespace, self.job_name, self.log, self.poll_s = core, namespace, job_name, log, poll_s
        self._stopping = threading.Event()
        self._muted = threading.Event()
        self._last: tuple[str, str] = ("", "")  # the newest timestamp passed on ...
        self._seen_at_last: set[str] = set()  # ... and the lines that carried it

    def stop(self, grace_s: float) -> None:
        """Stop following; lines that arrive within ``grace_s`` seconds are still passed on,
        later ones are dropped. A thread still blocked in its read ends when the stream does
        (the pod ends or is deleted with the job); it is a daemon and holds nothing else."""
        self._stopping.set()
        if self.is_alive() and grace_s > 0:
            self.join(grace_s)
        self._muted.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            pod = self._master_pod()
            if pod is not None and pod.status is not None and pod.status.phase in ("Running", "Succeeded", "Failed"):
                self._follow(pod.metadata.name)
            if self._stopping.wait(self.poll_s):
                if pod is not None and not self._muted.is_set():
                    self._follow(pod.metadata.name)  # one last read: lines written since
                return

    def _master_pod(self) -> client.V1Pod | None:
        selector = f"{JOB_NAME_LABEL}={self.job_name},{REPLICA_TYPE_LABEL}=master"
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=API_TIMEOUT_S).items
        except (ApiException, urllib3.exceptions.HTTPError):
            return None  # not there yet, or a hiccup: look again later
        for pod in pods:
            labels = pod.metadata.labels or {}
            if labels.get(JOB_NAME_LABEL) == self.job_name and labels.get(REPLICA_TYPE_LABEL) == "master":
                return pod
        return None

    def _follow(self, pod_name: str) -> None:
        response = None
        try:
            response = self.core.read_namespaced_pod_log(
                pod_name, self.namespace, container=CONTAINER_NAME, follow=not self._stopping.is_set(), timestamps=True,
                since_seconds=self._since_seconds(), _preload_content=False, _request_timeout=(API_TIMEOUT_S, None),
            )
            for line in iter_resp_lines(response):
                self._emit(line)
                if self._muted.is_set():
                    break
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
            pass  # the container is not ready, was replaced, or the stream broke: try again
        finally:
            if response is not None:
                response.close()

    def _emit(self, line: str) -> None:
        stamp, _, text = line.partition(" ")
        key = _timestamp_key(stamp)
        if self._muted.is_set() or key < self._last or (key == self._last and line in self._seen_at_last):
            return
        if key != self._last:
            self._last, self._seen_at_last = key, set()
        self._seen_at_last.add(line)
        for part in text.split("\r"):  # progress bars rewrite their line with carriage returns
            if part.strip():
                self.log(part.rstrip())

    def _since_seconds(self) -> int | None:
        try:
            seconds = calendar.timegm(time.strptime(self._last[0], "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None  # nothing passed on yet: from the start
        return max(1, math.ceil(time.time() - seconds) + 5)  # generous: seen lines are skipped


def _timestamp_key(stamp: str) -> tuple[str, str]:
    """An RFC 3339 timestamp as a key that sorts in time order (the kubelet trims trailing
    zeros of the nanoseconds, so the strings themselves do not sort)."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    return seconds[:19], fraction.ljust(9, "0")


register_backend("pytorchjob", PyTorchJobBackend)
