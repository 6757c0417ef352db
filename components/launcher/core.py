"""What a pretraining launch is, and the one interface every way of running it implements.

A :class:`PretrainJob` describes ``simclr pretrain`` on N nodes x K processes; a
:class:`TrainingBackend` runs one to completion (``local``: torchrun on this machine;
``pytorchjob``: a Kubeflow Training Operator PyTorchJob). :func:`launch` picks a backend by
name, turns SIGTERM (a cancelled pipeline step) into an exception so that the backend's
clean-up runs, and reports every failure as a :class:`LaunchError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

__all__ = [
    "PretrainJob",
    "LaunchError",
    "TrainingBackend",
    "register_backend",
    "get_backend",
    "backend_names",
    "launch",
    "job_name_for",
    "MAX_JOB_NAME_LENGTH",
]

Log = Callable[[str], None]

# The Training Operator names pods and services "<job>-worker-<index>"; a Service name is a
# DNS-1035 label of at most 63 characters, so the job's own name must leave room for that.
MAX_JOB_NAME_LENGTH = 48
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# A Kubernetes resource quantity as people write a volume's size (no exponent forms).
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


class LaunchError(Exception):
    """Pretraining did not finish successfully.

    Attributes:
        reason: a short machine-readable cause: the PyTorchJob's Failed condition reason,
            "Timeout", "Terminated", "ExitCode", "Conflict", ...
        exit_code: the local process's exit code, when there is one.
    """

    def __init__(self, message: str, reason: str = "", exit_code: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


@dataclasses.dataclass
class PretrainJob:
    """``simclr pretrain`` on ``num_nodes`` nodes with ``procs_per_node`` processes each.

    Attributes:
        name: the job's name, a DNS-1035 label of at most 48 characters (see :func:`job_name_for`).
        image: the container image (the project's image, with ``simclr`` and ``torchrun`` on PATH).
        simclr_args: the arguments after ``simclr pretrain``, e.g.
            ``["--data", "/mnt/simclr/data", "--out", "/mnt/simclr/run", "--epochs", "4"]``.
        num_nodes: pods: one Master and ``num_nodes - 1`` Workers.
        procs_per_node: processes per pod (``nprocPerNode``, ``torchrun --nproc-per-node``)
            on CPU; with GPUs each pod runs one process per GPU (see ``processes_per_node``).
        gpus_per_node: ``nvidia.com/gpu`` limit of each pod (0: none).
        cpu_request, cpu_limit, memory_request, memory_limit: each pod's resources ("" leaves one out).
        namespace: where the job runs; "" is this pod's own namespace, or "default" off-cluster.
        env: extra environment variables of the training processes.
        node_selector, tolerations: pod scheduling (tolerations as Kubernetes dicts).
        pvc_name, pvc_mount_path: a PersistentVolumeClaim for datasets and checkpoints, and
            where the pods mount it ("" for no volume, e.g. with gs:// paths).
        service_account: the pods' service account ("" for the namespace's default).
        backoff_limit: how many pod restarts the job tolerates before it fails.
        owner_pod: the pod that owns the job (ownerReference, for garbage collection); "" is
            this pod (``KFP_POD_NAME`` or ``HOSTNAME``) when running in a cluster.
        run_as_user: the non-root uid (and gid, fsGroup) of the pods: the image's user
            (the Dockerfile's SIMCLR_UID).
        shm_size: size of the in-memory /dev/shm (NCCL's intra-node buffers, tensors shared
            between threads); "" sizes it by the GPUs: 2Gi, and 2Gi per GPU above one.
        max_restarts: how often torchrun restarts a pod's processes (and, through the c10d
            rendezvous, every pod's) after one failed, each time resuming from the checkpoint.
        queue_name: Kueue LocalQueue (label ``kueue.x-k8s.io/queue-name``); "" for none.
        priority_class: the pods' PriorityClass ("" for the cluster's default).
        image_pull_secrets: names of Secrets to pull ``image`` with.
        runtime_name, runtime_kind: the Trainer v2 runtime a TrainJob references.
        stage_size: node-local staging (``simclr pretrain --stage-dir``): the ``sizeLimit`` of an
            emptyDir mounted at ``stage_mount_path`` in every trainer pod, into which each pod
            copies the dataset once and trains from the copy ("" = off: read ``--data`` in place).
            Size it above the prepared dataset: the kubelet evicts a pod whose emptyDir outgrows it.
        stage_mount_path: where the staging emptyDir is mounted (``--stage-dir``).
    """

    name: str
    image: str
    simclr_args: list[str]
    num_nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "8Gi"
    memory_limit: str = "16Gi"
    namespace: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: list[dict] = dataclasses.field(default_factory=list)
    pvc_name: str = ""
    pvc_mount_path: str = "/mnt/simclr"
    service_account: str = ""
    backoff_limit: int = 3
    owner_pod: str = ""
    run_as_user: int = 10001
    shm_size: str = ""
    max_restarts: int = 3
    queue_name: str = ""
    priority_class: str = ""
    image_pull_secrets: list[str] = dataclasses.field(default_factory=list)
    runtime_name: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    stage_size: str = ""
    stage_mount_path: str = "/stage"

    def __post_init__(self) -> None:
        if not _DNS1035.match(self.name) or len(self.name) > MAX_JOB_NAME_LENGTH:
            raise ValueError(
                f"job name {self.name!r} must be lower-case letters, digits and '-', start with a letter, "
                f"end with a letter or digit, and be at most {MAX_JOB_NAME_LENGTH} characters; "
                "job_name_for() makes one from any string"
            )
        if not self.image:
            raise ValueError("image must name the container image that has `simclr` and `torchrun`")
        if isinstance(self.simclr_args, str) or not all(isinstance(arg, str) for arg in self.simclr_args):
            raise ValueError(f"simclr_args must be a list of strings, got {self.simclr_args!r}")
        self.simclr_args = list(self.simclr_args)
        self.env = {str(name): str(value) for name, value in self.env.items()}
        for field, minimum in (("num_nodes", 1), ("procs_per_node", 1), ("gpus_per_node", 0), ("backoff_limit", 0), ("max_restarts", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
        if self.pvc_name and not self.pvc_mount_path.startswith("/"):
            raise ValueError(f"pvc_mount_path must be an absolute path, got {self.pvc_mount_path!r}")
        if self.gpus_per_node > 0 and self.procs_per_node not in (1, self.gpus_per_node):
            raise ValueError(
                f"procs_per_node={self.procs_per_node} with gpus_per_node={self.gpus_per_node}: a pod with GPUs runs "
                "one process per GPU; leave procs_per_node at 1 or set it to gpus_per_node"
            )
        if self.runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            raise ValueError(f"runtime_kind must be ClusterTrainingRuntime or TrainingRuntime, got {self.runtime_kind!r}")
        self.image_pull_secrets = [str(name) for name in self.image_pull_secrets]
        self._check_staging()
        if not self.shm_size:
            self.shm_size = f"{2 * max(1, self.gpus_per_node)}Gi"

    def _check_staging(self) -> None:
        if self.stage_size and not _QUANTITY.match(self.stage_size):
            raise ValueError(f"stage_size must be a Kubernetes quantity such as 50Gi (or '' for no staging), got {self.stage_size!r}")
        if not self.stage_mount_path.startswith("/") or self.stage_mount_path.rstrip("/") in ("", "/tmp", "/dev/shm", self.pvc_mount_path.rstrip("/")):
            raise ValueError(
                f"stage_mount_path must be an absolute path of its own (not /, /tmp, /dev/shm or the PVC's), got {self.stage_mount_path!r}"
            )

    @property
    def processes_per_node(self) -> int:
        """torchrun's processes per pod: one per GPU, else ``procs_per_node``."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.procs_per_node


def job_name_for(run_id: str, prefix: str = "simclr-pretrain") -> str:
    """A valid, deterministic job name made from any string (a run id, a pod name).

    Lower-cases ``prefix-run_id`` (just ``run_id`` when it starts with ``prefix`` already),
    replaces everything but letters and digits with '-', and when that is too long keeps its
    start plus 8 hex digits of a hash of the whole, so that different long ids still give
    different names.
    """
    text = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    if prefix and not text.startswith(prefix):
        text = re.sub(r"[^a-z0-9]+", "-", f"{prefix}-{text}".lower()).strip("-")
    if not text or not text[0].isalpha():
        text = f"job-{text}".rstrip("-")
    if len(text) <= MAX_JOB_NAME_LENGTH:
        return text
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{text[: MAX_JOB_NAME_LENGTH - 9].rstrip('-')}-{digest}"


@runtime_checkable
class TrainingBackend(Protocol):
    """Runs a :class:`PretrainJob` to completion.

    ``run`` returns when training succeeded; it raises :class:`LaunchError` when it failed or
    took longer than ``timeout_s`` seconds (0: no limit), and cleans up whatever it started
    before it returns or raises, on any exception (KeyboardInterrupt and SIGTERM included).
    ``log`` receives the training's output line by line, and the backend's own progress.
    """

    def run(self, job: PretrainJob, timeout_s: float, log: Log) -> None: ...


_BACKENDS: dict[str, Callable[[], TrainingBackend]] = {}


def register_backend(name: str, factory: Callable[[], TrainingBackend]) -> None:
    """Make ``launch(job, backend=name)`` use ``factory()`` (a backend class, or any callable)."""
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    """The names :func:`launch` accepts."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> TrainingBackend:
    """A new backend by its registered name."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown launcher backend {name!r}; choose one of {', '.join(backend_names())}") from None
    return factory()


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM. A BaseException, so that no ``except Exception``
    on the way swallows it before the backend's clean-up runs."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`_Terminated` in the main thread (once; a
    second SIGTERM during the clean-up is ignored). Elsewhere than in the main thread, Python
    cannot install signal handlers and this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch(job: PretrainJob, backend: str | TrainingBackend = "local", timeout_s: float = 0, log: Log = print) -> None:
    """Run ``job`` to completion with ``backend`` (a registered name or a backend object).

    Args:
        job: what to run.
        backend: "local" (torchrun here), "pytorchjob" (a PyTorchJob on the cluster), or a
            :class:`TrainingBackend` instance (e.g. a ``PyTorchJobBackend`` with its own API client).
        timeout_s: give up (and clean up) after this many seconds; 0 waits as long as it takes.
        log: receives the training's output and the launcher's progress, line by line.

    Raises:
        LaunchError: training failed, timed out, or this process received SIGTERM; whatever
            was started has been stopped and deleted.
        ValueError: an unknown backend name or a negative timeout.
    """
    if timeout_s < 0:
        raise ValueError(f"timeout_s must be >= 0 (0: no limit), got {timeout_s}")
    runner = get_backend(backend) if isinstance(backend, str) else backend
    with _sigterm_raises():
        try:
            runner.run(job, timeout_s, log)
        except _Terminated:
            raise LaunchError(
                f"pretraining job {job.name} stopped: this process received SIGTERM (was the run cancelled?)",
                reason="Terminated",
            ) from None
