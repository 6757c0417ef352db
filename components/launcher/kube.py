"""What every cluster backend shares: the API client, the namespace, and the create / watch /
stream-the-log / delete cycle of one custom-resource job.

A backend (``pytorchjob``, ``trainjob``) is a :class:`ClusterJobBackend` that names its
resource (:class:`JobResource`), builds its object and reads its outcome. The cycle: a job of
the same name (a retried step, a launcher that was killed) is deleted first, then the job is
created with an ownerReference to the launching pod (so that Kubernetes' garbage collector
removes it even if the launcher is killed outright), watched until it ends or the timeout,
its lead pod's log streamed meanwhile, and deleted however the wait ends.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from components.launcher.core import LaunchError, Log, PretrainJob

__all__ = [
    "JobResource", "JobOutcome", "ClusterJobBackend", "condition_outcome", "load_api_client", "resolve_namespace",
    "API_TIMEOUT_S", "DEADLINE_MARGIN_S",
]

SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The server-side deadline outlasts the launcher's own timeout by this much, so the
# launcher reports the timeout itself; the deadline only matters if the launcher vanished.
DEADLINE_MARGIN_S = 120
API_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class JobResource:
    """A job kind an operator runs.

    Attributes:
        group, version, plural, kind: the custom resource.
        container: the trainer container whose log is streamed.
        lead_pod_labels: job name -> the labels of the pod of rank 0 (whose log is streamed).
        hints: API status -> what to add to a failed create's message (a missing CRD, RBAC).
    """

    group: str
    version: str
    plural: str
    kind: str
    container: str
    lead_pod_labels: Callable[[str], dict[str, str]]
    hints: dict[int, str]

    @property
    def path(self) -> tuple[str, str, str]:
        return self.group, self.version, self.plural


# ------------------------------------------------------------------------------ its state


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """How a finished job ended: its success or failure condition."""

    succeeded: bool
    reason: str
    message: str


def condition_outcome(obj: dict, succeeded: str, failed: str) -> JobOutcome | None:
    """The outcome of a job object whose ``succeeded`` or ``failed`` condition type is True, or
    None while it is still going."""
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in (succeeded, failed):
            return JobOutcome(condition["type"] == succeeded, condition.get("reason", ""), condition.get("message", ""))
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


def own_pod_name() -> str:
    """This pod's name (KFP's KFP_POD_NAME, else HOSTNAME), or "" when not in a pod."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return ""
    return os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME", "")


class ClusterJobBackend:
    """Runs a :class:`PretrainJob` as a custom resource (``resource``) and waits for it.

    Subclasses give the resource, :meth:`build` (the object) and :meth:`outcome` (how it ended).
    The rest is the same for every operator: replace a job of the same name, create, watch
    until it ends or the timeout, stream the lead pod's log meanwhile, delete however the wait
    ends, and report failures as :class:`LaunchError`.

    Args:
        api_client: the Kubernetes API client; default :func:`load_api_client` at run time.
        watch_timeout_s: each watch request lasts at most this long before it is renewed.
        log_poll_s: how often to look for the lead pod (and reconnect to its log).
        log_grace_s: after the job finished, how long the rest of the lead pod's log may take.
    """

    resource: JobResource

    def build(self, job: PretrainJob, namespace: str, owner_reference: dict | None, timeout_s: float) -> dict:
        raise NotImplementedError

    def outcome(self, obj: dict) -> JobOutcome | None:
        raise NotImplementedError

    def describe(self, body: dict) -> str:
        """What was created, for the log."""
        return ""

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
        owner = self.owner_reference(core, job.owner_pod or own_pod_name(), namespace, log)
        body = self.build(job, namespace, owner, timeout_s)
        follower = _LeadPodLogFollower(core, namespace, job.name, self.resource, log, self.log_poll_s)
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
                f"{self.resource.kind} {namespace}/{job.name} failed: {outcome.reason or 'no reason given'}: {outcome.message}".rstrip(": "),
                reason=outcome.reason or "Failed",
            )
        log(f"launcher: {self.resource.kind} {namespace}/{job.name} succeeded")

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
        kind, (group, version, plural) = self.resource.kind, self.resource.path
        for attempt in range(2):
            try:
                custom.create_namespaced_custom_object(group, version, namespace, plural, body, _request_timeout=API_TIMEOUT_S)
                break
            except urllib3.exceptions.HTTPError as error:
                raise LaunchError(f"cannot reach the Kubernetes API to create {kind} {namespace}/{name}: {error}", reason="ApiError") from error
            except ApiException as error:
                if error.status != 409 or attempt:
                    raise LaunchError(
                        f"cannot create {kind} {namespace}/{name}: {error.status} {error.reason}: {_api_message(error)}"
                        f"{self.resource.hints.get(error.status, '')}",
                        reason="Conflict" if error.status == 409 else "ApiError",
                    ) from error
                log(f"launcher: a {kind} {namespace}/{name} exists already; replacing it")
                self._delete(custom, namespace, name, log)
                self._wait_gone(custom, namespace, name)
        log(f"launcher: created {kind} {namespace}/{name}: {self.describe(body)}")

    def _wait_gone(self, custom: client.CustomObjectsApi, namespace: str, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                custom.get_namespaced_custom_object(*self.resource.path[:2], namespace, self.resource.path[2], name, _request_timeout=API_TIMEOUT_S)
            except ApiException as error:
                if error.status == 404:
                    return
            except urllib3.exceptions.HTTPError:
                pass  # ask again
            time.sleep(1.0)
        raise LaunchError(f"the old {self.resource.kind} {namespace}/{name} was not deleted within {timeout_s:g} s", reason="Conflict")

    def _wait(self, custom: client.CustomObjectsApi, namespace: str, name: str, timeout_s: float, log: Log) -> JobOutcome:
        """Wait for the job's Succeeded or Failed condition; raise LaunchError on timeout, when
        the job is deleted by someone else, or when the API refuses to let us watch it.
        The watch runs in a thread, so that this (main) thread keeps the deadline and stays
        responsive to SIGTERM whatever the connection does."""
        watcher = _JobWatcher(custom, self.resource, self.outcome, namespace, name, log, self.watch_timeout_s)
        watcher.start()
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        try:
            while not watcher.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"{self.resource.kind} {namespace}/{name} did not finish within {timeout_s:g} s (timeout); it was deleted",
                        reason="Timeout",
                    )
        finally:
            watcher.stop()
        if watcher.error is not None:
            raise watcher.error
        return watcher.outcome

    def _delete(self, custom: client.CustomObjectsApi, namespace: str, name: str, log: Log) -> None:
        """Delete the job and, in the background, its pods. Never raises: it runs on the way out
        of failures that matter more."""
        (group, version, plural), kind = self.resource.path, self.resource.kind
        try:
            custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name,
                body=client.V1DeleteOptions(propagation_policy="Background"), _request_timeout=API_TIMEOUT_S,
            )
            log(f"launcher: deleted {kind} {namespace}/{name}")
        except ApiException as error:
            if error.status != 404:
                log(f"launcher: warning: cannot delete {kind} {namespace}/{name}: {error.status} {error.reason}")
        except urllib3.exceptions.HTTPError as error:
            log(f"launcher: warning: cannot delete {kind} {namespace}/{name}: {error}")


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(error.body or "")[:500]


# ------------------------------------------------------------------------------ the watch


class _JobWatcher(threading.Thread):
    """Watches one job until it has an outcome (``outcome``) or cannot be watched
    (``error``), then sets ``done``. Each watch starts with the job's current state (the API
    server's initial ADDED event) and lasts ``renew_s`` seconds; a dropped connection, an
    expired watch (410) or an unavailable API server (5xx) just start the next one."""

    def __init__(self, custom: client.CustomObjectsApi, resource: "JobResource", outcome: Callable[[dict], JobOutcome | None],
                 namespace: str, name: str, log: Log, renew_s: float):
        super().__init__(name=f"launcher-watch-{name}", daemon=True)
        self.custom, self.namespace, self.name, self.log, self.renew_s = custom, namespace, name, log, renew_s
        self.resource, self.outcome_of = resource, outcome
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
                            f"cannot watch {self.resource.kind} {self.namespace}/{self.name}: {error.status} {error.reason}", reason="ApiError"))
                    elif self._stopping.wait(1.0):
                        return
        except Exception as error:  # anything unforeseen ends the wait rather than hanging it
            self._finish(error=LaunchError(f"watching {self.resource.kind} {self.namespace}/{self.name} failed: {error!r}", reason="ApiError"))

    def _watch_once(self) -> None:
        # watch="true" as kubectl sends it (the client's Watch helper sends "True").
        (group, version, plural) = self.resource.path
        response = self.custom.list_namespaced_custom_object(
            group, version, self.namespace, plural, field_selector=f"metadata.name={self.name}", watch="true",
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
            self._finish(error=LaunchError(f"{self.resource.kind} {self.namespace}/{self.name} no longer exists", reason="Deleted"))

    def _handle(self, event: dict) -> bool:
        """Act on one watch event; True when the wait is over."""
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason', '')}: {obj.get('message', '')}")
        if (obj.get("metadata") or {}).get("name") != self.name:
            return False  # a server that ignores the field selector
        if event.get("type") == "DELETED":
            self._finish(error=LaunchError(f"{self.resource.kind} {self.namespace}/{self.name} was deleted before it finished", reason="Deleted"))
            return True
        state = _latest_condition(obj)
        if state and state != self._shown:
            self.log(f"launcher: {self.resource.kind} {self.namespace}/{self.name}: {state}")
            self._shown = state
        outcome = self.outcome_of(obj)
        if outcome is not None:
            self._finish(outcome=outcome)
        return outcome is not None

    def _finish(self, outcome: JobOutcome | None = None, error: LaunchError | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()


# ------------------------------------------------------------------------------ the log


class _LeadPodLogFollower(threading.Thread):
    """Streams the lead pod's trainer container log (rank 0's pod) into ``log`` until stopped.

    It waits for the pod to exist and start, follows its log, and reconnects when the stream
    ends (a restarted container, a dropped connection), skipping lines it has already passed
    on (each line carries the kubelet's timestamp).
    """

    def __init__(self, core: client.CoreV1Api, namespace: str, job_name: str, resource: "JobResource", log: Log, poll_s: float):
        super().__init__(name=f"launcher-log-{job_name}", daemon=True)
        self.core, self.namespace, self.job_name, self.log, self.poll_s = core, namespace, job_name, log, poll_s
        self.lead_labels, self.container = resource.lead_pod_labels(job_name), resource.container
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
            pod = self._lead_pod()
            if pod is not None and pod.status is not None and pod.status.phase in ("Running", "Succeeded", "Failed"):
                self._follow(pod.metadata.name)
            if self._stopping.wait(self.poll_s):
                if pod is not None and not self._muted.is_set():
                    self._follow(pod.metadata.name)  # one last read: lines written since
                return

    def _lead_pod(self) -> client.V1Pod | None:
        selector = ",".join(f"{key}={value}" for key, value in self.lead_labels.items())
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=API_TIMEOUT_S).items
        except (ApiException, urllib3.exceptions.HTTPError):
            return None  # not there yet, or a hiccup: look again later
        for pod in pods:
            labels = pod.metadata.labels or {}
            if all(labels.get(key) == value for key, value in self.lead_labels.items()):  # a server may ignore the selector
                return pod
        return None

    def _follow(self, pod_name: str) -> None:
        response = None
        try:
            response = self.core.read_namespaced_pod_log(
                pod_name, self.namespace, container=self.container, follow=not self._stopping.is_set(), timestamps=True,
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


