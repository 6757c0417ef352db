"""The pretraining launcher: the PyTorchJob it builds (against the CRD's schema), its
create/watch/fail/timeout/cancel/delete paths against a Kubernetes API emulator that the
real kubernetes client talks to (kmock), and the local torchrun backend on tiny data."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jsonschema
import kmock
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from components.launcher import (
    MAX_JOB_NAME_LENGTH,
    LaunchError,
    PretrainJob,
    PyTorchJobBackend,
    TrainingBackend,
    build_pytorchjob,
    job_name_for,
    launch,
)
from components.launcher.kube import JobResource
from components.launcher.pytorchjob import PYTORCHJOB
from components.launcher.trainjob import TRAINJOB, TrainJobBackend, build_trainjob
from tests.conftest import REPO, TINY_PRETRAIN

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
NAMESPACE = "team-a"
ARGS = ["--data", "/mnt/simclr/data", "--out", "/mnt/simclr/run", "--epochs", "4"]
OWNER = {"apiVersion": "v1", "kind": "Pod", "name": "pipeline-step-pod", "uid": "4c1d8a9e-0000-4000-8000-000000000001"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
MASTER_LOG = b"2026-11-22T10:00:00.1Z simclr: step 1 loss 5.1\n2026-11-22T10:00:00.12Z simclr: step 2 loss 4.9\r4.8\n"


# ------------------------------------------------------------------------------ the built object


def _strict(schema):
    """The schema with unknown fields forbidden wherever it lists its fields, as the API server
    does with strict field validation (it would otherwise drop a misspelt field silently)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_validator(file_name: str, version: str) -> jsonschema.Draft7Validator:
    """A strict validator for ``version`` of the CRD in ../shared/schemas/``file_name``."""
    path = SCHEMAS / file_name
    assert path.is_file(), f"the CRD is missing: {path} (the shared/ directory sits beside the clone)"
    crd = yaml.safe_load(path.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(_strict(schema))


@pytest.fixture(scope="module")
def pytorchjob_validator() -> jsonschema.Draft7Validator:
    return _crd_validator("kubeflow.org_pytorchjobs.yaml", "v1")


def _job(**overrides) -> PretrainJob:
    settings = dict(
        name="simclr-pretrain-run-1", image="registry.example/simclr:0.1.0", simclr_args=ARGS, num_nodes=2,
        procs_per_node=4, gpus_per_node=4, pvc_name="simclr-data", node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[GPU_TOLERATION], env={"NCCL_DEBUG": "WARN"}, service_account="pipeline-runner", namespace=NAMESPACE,
    )
    settings.update(overrides)
    return PretrainJob(**settings)


def _errors(validator: jsonschema.Draft7Validator, obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_built_pytorchjob_matches_the_crd_schema_and_the_request(pytorchjob_validator, nodes):
    job = _job(num_nodes=nodes)
    obj = build_pytorchjob(job, NAMESPACE, OWNER, timeout_s=3600)
    assert _errors(pytorchjob_validator, obj) == []

    assert (obj["apiVersion"], obj["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert obj["metadata"]["name"] == job.name and obj["metadata"]["namespace"] == NAMESPACE
    assert obj["metadata"]["ownerReferences"] == [OWNER]
    spec = obj["spec"]
    assert spec["nprocPerNode"] == "4"
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["cleanPodPolicy"] in ("Running", "All")
    assert spec["runPolicy"]["activeDeadlineSeconds"] > 3600
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if nodes == 1:
        assert set(replicas) == {"Master"}
    else:
        assert set(replicas) == {"Master", "Worker"} and replicas["Worker"]["replicas"] == nodes - 1
    for replica in replicas.values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == job.image
        assert container["command"] == [
            "torchrun", "--no-python", "--max-restarts", "3",  # a failed process restarts every pod's, from the checkpoint
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)", "--rdzv-id", job.name,
            "simclr", "pretrain", "--metrics-port", "9090", *ARGS,
        ]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and {"cpu", "memory"} <= set(container["resources"]["limits"])
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_DEBUG"] == "WARN"
        assert not {"WORLD_SIZE", "RANK", "MASTER_ADDR", "PET_NNODES"} & set(env)  # the operator's to set
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/mnt/simclr"]]["persistentVolumeClaim"] == {"claimName": "simclr-data"}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "emptyDir" in volumes[mounts["/tmp"]]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["tolerations"] == [GPU_TOLERATION]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert pod["serviceAccountName"] == "pipeline-runner"


def test_cpu_job_without_volume_or_owner(pytorchjob_validator):
    obj = build_pytorchjob(_job(gpus_per_node=0, pvc_name="", num_nodes=1, procs_per_node=2), NAMESPACE)
    assert _errors(pytorchjob_validator, obj) == []
    container = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "/mnt/simclr" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert "ownerReferences" not in obj["metadata"] and "activeDeadlineSeconds" not in obj["spec"]["runPolicy"]
    assert obj["spec"]["nprocPerNode"] == "2"


def test_the_schema_check_catches_a_malformed_job(pytorchjob_validator):
    obj = build_pytorchjob(_job(), NAMESPACE)
    broken = copy.deepcopy(obj)
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    assert any("replicas" in error for error in _errors(pytorchjob_validator, broken))
    broken = copy.deepcopy(obj)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"] = ["4"]
    assert _errors(pytorchjob_validator, broken)
    broken = copy.deepcopy(obj)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["nodeSelecter"] = {"a": "b"}
    assert any("nodeSelecter" in error for error in _errors(pytorchjob_validator, broken))


@pytest.fixture(scope="module")
def trainjob_validator() -> jsonschema.Draft7Validator:
    return _crd_validator("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1")  # Trainer v2.3.0


def _patched_pod(obj: dict) -> dict:
    (patch,) = obj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch runtimes' replicated job and container
    return node["template"]["spec"]["template"]


@pytest.mark.parametrize("nodes,gpus,pvc", [(1, 0, ""), (2, 4, "simclr-data"), (4, 1, "simclr-data"), (2, 0, "")])
def test_built_trainjob_matches_the_v2_3_crd_strictly_and_the_request(trainjob_validator, nodes, gpus, pvc):
    job = _job(num_nodes=nodes, gpus_per_node=gpus, procs_per_node=gpus or 2, pvc_name=pvc, queue_name="team-a-queue",
               image_pull_secrets=["registry-credentials"])
    obj = build_trainjob(job, NAMESPACE, OWNER, timeout_s=3600)
    assert _errors(trainjob_validator, obj) == []
    assert (obj["apiVersion"], obj["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert obj["metadata"]["ownerReferences"] == [OWNER] and obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    spec = obj["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] > 3600
    trainer = spec["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == (gpus or 2)  # one process per GPU
    assert trainer["image"] == job.image and trainer["command"][:2] == ["torchrun", "--no-python"]
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]  # Trainer refuses its reserved variables
    limits = trainer["resourcesPerNode"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    pod = _patched_pod(obj)
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    pod_spec = pod["spec"]
    (container,) = pod_spec["containers"]
    assert container["name"] == "node"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{2 * max(1, gpus)}Gi"}
    if pvc:
        assert volumes[mounts["/mnt/simclr"]]["persistentVolumeClaim"] == {"claimName": pvc}
    else:
        assert "/mnt/simclr" not in mounts
    assert pod_spec["serviceAccountName"] == "pipeline-runner" and pod_spec["tolerations"] == [GPU_TOLERATION]
    assert pod_spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_trainjob_schema_check_catches_what_v2_3_does_not_have(trainjob_validator):
    obj = build_trainjob(_job(), NAMESPACE)
    for mutate, field in (
        (lambda o: o["spec"].__setitem__("podTemplateOverrides", []), "podTemplateOverrides"),  # the v2.0 to v2.2 field
        (lambda o: _patched_pod(o)["spec"].__setitem__("priorityClassName", "high"), "priorityClassName"),
        (lambda o: _patched_pod(o)["spec"]["containers"][0].__setitem__("ports", []), "ports"),
        (lambda o: o["spec"]["trainer"].__setitem__("numProcPerNode", "2"), "numProcPerNode"),
    ):
        broken = copy.deepcopy(obj)
        mutate(broken)
        assert any(field in error for error in _errors(trainjob_validator, broken)), field
    with pytest.raises(ValueError, match="cannot set its pods' priorityClassName"):
        build_trainjob(_job(priority_class="high"), NAMESPACE)


def test_pytorchjob_carries_queue_priority_and_pull_secrets(pytorchjob_validator):
    obj = build_pytorchjob(_job(queue_name="team-a-queue", priority_class="high", image_pull_secrets=["registry-credentials"]), NAMESPACE)
    assert _errors(pytorchjob_validator, obj) == []
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert obj["spec"]["runPolicy"]["schedulingPolicy"] == {"priorityClass": "high"}
    for replica in obj["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["priorityClassName"] == "high" and pod["imagePullSecrets"] == [{"name": "registry-credentials"}]


def _stage_volume(pod_spec: dict, container: dict) -> dict | None:
    """The volume mounted at the path the trainer command passes as --stage-dir, or None."""
    command = container.get("command", [])
    if "--stage-dir" not in command:
        return None
    path = command[command.index("--stage-dir") + 1]
    (name,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == name]
    return volume


def test_staging_gives_every_pytorchjob_pod_an_emptydir_at_its_stage_dir(pytorchjob_validator):
    obj = build_pytorchjob(_job(num_nodes=3, stage_size="50Gi"), NAMESPACE)
    assert _errors(pytorchjob_validator, obj) == []
    for replica in obj["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert _stage_volume(pod, container) == {"name": "stage", "emptyDir": {"sizeLimit": "50Gi"}}
        command = container["command"]
        assert command[command.index("--stage-dir") + 1] == "/stage"
        assert command.index("--stage-dir") < command.index(ARGS[0])  # the job's own --stage-dir would win
        kubernetes_validate.validate(_as_pod(obj, replica), "1.32.0", strict=True)
    off = build_pytorchjob(_job(), NAMESPACE)
    for replica in off["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        assert "--stage-dir" not in container["command"] and "stage" not in {v["name"] for v in replica["template"]["spec"]["volumes"]}


def _as_pod(obj: dict, replica: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": NAMESPACE},
            "spec": {**replica["template"]["spec"], "restartPolicy": replica["restartPolicy"]}}


def test_staging_gives_the_trainjob_pods_an_emptydir_at_their_stage_dir(trainjob_validator):
    obj = build_trainjob(_job(stage_size="200Gi", stage_mount_path="/local-ssd/stage"), NAMESPACE)
    assert _errors(trainjob_validator, obj) == []
    pod = _patched_pod(obj)
    (container,) = pod["spec"]["containers"]
    volume = _stage_volume(pod["spec"], {**container, "command": obj["spec"]["trainer"]["command"]})
    assert volume == {"name": "stage", "emptyDir": {"sizeLimit": "200Gi"}}


@pytest.mark.parametrize("size,path,problem", [
    ("50 Gi", "/stage", "stage_size must be a Kubernetes quantity"),
    ("-1Gi", "/stage", "stage_size must be a Kubernetes quantity"),
    ("50Gi", "stage", "stage_mount_path must be an absolute path"),
    ("50Gi", "/tmp", "stage_mount_path must be an absolute path of its own"),
    ("50Gi", "/mnt/simclr/", "stage_mount_path must be an absolute path of its own"),
])
def test_bad_staging_settings_are_refused(size, path, problem):
    with pytest.raises(ValueError, match=problem):
        _job(stage_size=size, stage_mount_path=path)


def test_gpus_set_the_processes_per_pod():
    assert _job(gpus_per_node=4, procs_per_node=1).processes_per_node == 4
    assert _job(gpus_per_node=0, procs_per_node=3).processes_per_node == 3
    with pytest.raises(ValueError, match="one process per GPU"):
        _job(gpus_per_node=4, procs_per_node=2)


def test_trainer_pods_carry_the_labels_the_podmonitor_and_networkpolicy_select():
    podmonitor = yaml.safe_load((REPO / "manifests" / "podmonitor.yaml").read_text())
    policies = [p for p in yaml.safe_load_all((REPO / "manifests" / "networkpolicy.yaml").read_text()) if p]
    trainer_policy = next(p for p in policies if p["metadata"]["name"] == "simclr-pretrain")
    obj = build_pytorchjob(_job(), NAMESPACE)
    for replica in obj["spec"]["pytorchReplicaSpecs"].values():
        labels = replica["template"]["metadata"]["labels"]
        assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert trainer_policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        (container,) = replica["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        command = container["command"]  # local rank k serves on --metrics-port + k (monitoring.py)
        first = int(command[command.index("--metrics-port") + 1])
        metrics = {name: port for name, port in ports.items() if name.startswith("metrics")}
        assert sorted(metrics.values()) == [first + rank for rank in range(4)]  # one per process of the pod
        scraped = {endpoint["port"] for endpoint in podmonitor["spec"]["podMetricsEndpoints"]}
        assert set(metrics) <= scraped  # the PodMonitor scrapes every one of them
        (allowed,) = trainer_policy["spec"]["ingress"][1]["ports"]  # and the NetworkPolicy lets Prometheus in
        assert all(allowed["port"] <= port <= allowed["endPort"] for port in metrics.values())


def test_job_names_are_valid_dns_labels_and_deterministic():
    for run_id in ("run-1", "Pipeline_Run 2026/11/22", "9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f" * 3, "x" * 200, "---"):
        name = job_name_for(run_id)
        assert name == job_name_for(run_id)
        assert len(name) <= MAX_JOB_NAME_LENGTH
        PretrainJob(name=name, image="i", simclr_args=[])  # validates the name
    assert job_name_for("a" * 100 + "1") != job_name_for("a" * 100 + "2")
    assert job_name_for("Run 7") == "simclr-pretrain-run-7"
    assert job_name_for("simclr-pretrain-run-7") == "simclr-pretrain-run-7"  # no double prefix
    for bad in ("Upper", "1starts-with-digit", "ends-", "x" * (MAX_JOB_NAME_LENGTH + 1), "under_score"):
        with pytest.raises(ValueError, match="job name"):
            PretrainJob(name=bad, image="i", simclr_args=[])
    with pytest.raises(ValueError, match="num_nodes"):
        PretrainJob(name="ok", image="i", simclr_args=[], num_nodes=0)


def test_unknown_backend_and_backend_protocol():
    with pytest.raises(ValueError, match="unknown launcher backend 'slurm'.*local.*pytorchjob"):
        launch(_job(), backend="slurm")
    assert isinstance(PyTorchJobBackend(), TrainingBackend)


# ------------------------------------------------------------------------------ against kmock


class Emulator:
    """kmock's Kubernetes emulator served on 127.0.0.1 from its own event-loop thread."""

    def __init__(self):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="kmock", daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "kmock did not start"
        self.api_client = client.ApiClient(client.Configuration(host=self.url))
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            for resource in (PYTORCHJOB, TRAINJOB):
                handler.resources["/".join(resource.path)] = {"kind": resource.kind, "namespaced": True}
            handler.resources["v1/pods"] = {"kind": "Pod", "namespaced": True}
            # the kubelet's side of `kubectl logs`: timestamped lines (the emulator keeps no logs)
            handler["get", kmock.resource("v1/pods"), kmock.subresource("log")] << MASTER_LOG
            self.handler, self.url = handler, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def get_job(self, name: str, resource: JobResource = PYTORCHJOB) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(resource.group, resource.version, NAMESPACE, resource.plural, name)
        except client.ApiException as error:
            if error.status == 404:
                return None
            raise


@pytest.fixture
def emulator():
    emu = Emulator()
    emu.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": OWNER["name"], "namespace": NAMESPACE, "uid": OWNER["uid"]}})
    yield emu
    emu.close()


@dataclasses.dataclass(frozen=True)
class Operator:
    """What the kmock tests need to know of an operator: its resource, backend and builder, and
    the conditions it writes when a job succeeds or fails (from its API: PyTorchJob
    Succeeded/Failed, TrainJob Complete/Failed)."""

    resource: JobResource
    backend: type
    build: object
    succeeded: dict
    failed: dict


OPERATORS = {
    "pytorchjob": Operator(
        PYTORCHJOB, PyTorchJobBackend, build_pytorchjob,
        {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded", "message": "done"},
        {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
         "message": "pytorchjob simclr-pretrain-run-1 is failed because 1 Master replica(s) failed."},
    ),
    "trainjob": Operator(
        TRAINJOB, TrainJobBackend, build_trainjob,
        {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "jobset completed"},
        {"type": "Failed", "status": "True", "reason": "FailedJobs", "message": "jobset simclr-pretrain-run-1 failed: node-0 reached its backoff limit"},
    ),
}


@pytest.fixture(params=list(OPERATORS))
def operator_kind(request) -> Operator:
    return OPERATORS[request.param]


class StandInOperator(threading.Thread):
    """Plays the operator through the API: waits for the launcher's job, starts its lead pod
    (rank 0), waits for ``until`` (e.g. the launcher has streamed the log), then writes
    ``conditions`` into the job's status subresource (or, with "delete", deletes the job)."""

    def __init__(self, emu: Emulator, name: str, conditions: list[dict] | str | None, until=lambda: True, is_new=lambda job: True,
                 operator: Operator = OPERATORS["pytorchjob"]):
        super().__init__(daemon=True)
        self.emu, self.name, self.conditions, self.until, self.is_new = emu, name, conditions, until, is_new
        self.resource = operator.resource
        self.seen: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.seen = _wait_for(lambda: (job := self.emu.get_job(self.name, self.resource)) and self.is_new(job) and job, "the job")
            labels = self.resource.lead_pod_labels(self.name)
            pod = {"metadata": {"name": f"{self.name}-lead-0", "namespace": NAMESPACE, "labels": labels}, "status": {"phase": "Running"}}
            self.emu.core.create_namespaced_pod(NAMESPACE, pod)
            running = {"type": "Running", "status": "True", "reason": "PyTorchJobRunning", "message": "running"}
            self._set_status([running])
            _wait_for(self.until, "the launcher")
            if self.conditions == "delete":
                self.emu.custom.delete_namespaced_custom_object(self.resource.group, self.resource.version, NAMESPACE, self.resource.plural, self.name)
            elif self.conditions is not None:
                self._set_status([{**running, "status": "False"}, *self.conditions])
        except BaseException as error:  # reported by the test
            self.error = error

    def _set_status(self, conditions: list[dict]) -> None:
        group, version, plural = self.resource.path
        self.emu.custom.patch_namespaced_custom_object_status(group, version, NAMESPACE, plural, self.name, {"status": {"conditions": conditions}})

    def check(self) -> dict:
        self.join(10)
        assert self.error is None, f"the stand-in operator failed: {self.error!r}"
        return self.seen


def _wait_for(predicate, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _backend(emu: Emulator, operator: Operator = OPERATORS["pytorchjob"]):
    return operator.backend(api_client=emu.api_client, watch_timeout_s=1.0, log_poll_s=0.05, log_grace_s=2.0)


def _streamed(lines: list[str]) -> bool:
    return "simclr: step 2 loss 4.9" in lines


def test_job_succeeds_streams_the_lead_pods_log_and_is_deleted(emulator, operator_kind):
    job = _job(owner_pod=OWNER["name"])
    lines: list[str] = []
    operator = StandInOperator(emulator, job.name, [operator_kind.succeeded], until=lambda: _streamed(lines), operator=operator_kind)
    operator.start()
    launch(job, backend=_backend(emulator, operator_kind), timeout_s=60, log=lines.append)
    created = operator.check()

    assert created["metadata"]["ownerReferences"] == [OWNER]  # uid read from the pod
    assert created["kind"] == operator_kind.resource.kind
    assert emulator.get_job(job.name, operator_kind.resource) is None
    # each line once, although the log was read several times; a progress bar's \r splits
    assert [line for line in lines if line.startswith("simclr:")] == ["simclr: step 1 loss 5.1", "simclr: step 2 loss 4.9"]
    assert "4.8" in lines
    assert any("succeeded" in line for line in lines)
    assert any(f"deleted {operator_kind.resource.kind}" in line for line in lines)


def test_failed_job_raises_with_its_reason_and_is_deleted(emulator, operator_kind):
    job = _job(owner_pod=OWNER["name"])
    failed = operator_kind.failed
    operator = StandInOperator(emulator, job.name, [failed], operator=operator_kind)
    operator.start()
    with pytest.raises(LaunchError, match=f"{failed['reason']}: {failed['message'][:40]}") as caught:
        launch(job, backend=_backend(emulator, operator_kind), timeout_s=60, log=lambda line: None)
    operator.check()
    assert caught.value.reason == failed["reason"]
    assert emulator.get_job(job.name, operator_kind.resource) is None


def test_job_timeout_raises_and_deletes_the_job(emulator, operator_kind):
    job = _job(owner_pod="no-such-pod")
    lines: list[str] = []
    operator = StandInOperator(emulator, job.name, conditions=None, operator=operator_kind)  # never finishes
    operator.start()
    started = time.monotonic()
    with pytest.raises(LaunchError, match="did not finish within 2 s \\(timeout\\)") as caught:
        launch(job, backend=_backend(emulator, operator_kind), timeout_s=2, log=lines.append)
    assert time.monotonic() - started >= 2  # it waited for the timeout (no upper bound: a loaded machine is slow)
    created = operator.check()
    assert caught.value.reason == "Timeout"
    assert emulator.get_job(job.name, operator_kind.resource) is None
    spec = created["spec"]
    assert (spec["runPolicy"] if "runPolicy" in spec else spec)["activeDeadlineSeconds"] >= 2  # the server-side backstop
    assert "ownerReferences" not in created["metadata"]  # the owner pod does not exist ...
    assert any("cannot read pod team-a/no-such-pod" in line for line in lines)  # ... and the log says so


def test_a_job_deleted_by_someone_else_is_a_launch_error(emulator, operator_kind):
    job = _job()
    operator = StandInOperator(emulator, job.name, "delete", operator=operator_kind)
    operator.start()
    with pytest.raises(LaunchError, match="was deleted before it finished") as caught:
        launch(job, backend=_backend(emulator, operator_kind), timeout_s=60, log=lambda line: None)
    operator.check()
    assert caught.value.reason == "Deleted"


def test_an_existing_job_of_the_same_name_is_replaced(emulator, operator_kind):
    job = _job()
    old = operator_kind.build(job, NAMESPACE)
    old["metadata"]["labels"]["generation"] = "old"
    group, version, plural = operator_kind.resource.path
    emulator.custom.create_namespaced_custom_object(group, version, NAMESPACE, plural, old)
    lines: list[str] = []
    operator = StandInOperator(emulator, job.name, [operator_kind.succeeded], operator=operator_kind,
                               is_new=lambda obj: "generation" not in obj["metadata"]["labels"])
    operator.start()
    launch(job, backend=_backend(emulator, operator_kind), timeout_s=60, log=lines.append)
    operator.check()
    assert any("exists already; replacing it" in line for line in lines)
    assert emulator.get_job(job.name, operator_kind.resource) is None


@pytest.mark.parametrize("backend_name", ["pytorchjob", "trainjob"])
def test_sigterm_deletes_the_job(emulator, backend_name):
    """A cancelled pipeline step gets SIGTERM: the launcher deletes its job and fails."""
    operator_kind = OPERATORS[backend_name]
    script = textwrap.dedent(f"""
        import sys
        from kubernetes import client
        from components.launcher import PretrainJob, get_backend, launch
        job = PretrainJob(name="cancelled-run", image="img", simclr_args=[], namespace={NAMESPACE!r})
        backend = get_backend({backend_name!r})
        backend.api_client, backend.watch_timeout_s = client.ApiClient(client.Configuration(host=sys.argv[1])), 1.0
        launch(job, backend=backend, timeout_s=120, log=lambda line: print(line, flush=True))
    """)
    process = subprocess.Popen([sys.executable, "-c", script, emulator.url], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: emulator.get_job("cancelled-run", operator_kind.resource) or process.poll() is not None, "the job", timeout_s=60)
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)  # the launcher is inside its watch now
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "LaunchError" in stderr and "received SIGTERM" in stderr
    assert f"deleted {operator_kind.resource.kind} team-a/cancelled-run" in stdout
    assert emulator.get_job("cancelled-run", operator_kind.resource) is None


def test_backend_by_name_reads_the_kubeconfig(emulator, tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "kmock", "cluster": {"server": emulator.url}}],
        "users": [{"name": "tester", "user": {"token": "unused"}}],
        "contexts": [{"name": "test", "context": {"cluster": "kmock", "user": "tester", "namespace": NAMESPACE}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    job = _job(namespace="")  # the context's namespace
    failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too slow"}
    operator = StandInOperator(emulator, job.name, [failed])
    operator.start()
    with pytest.raises(LaunchError, match="DeadlineExceeded: too slow"):
        launch(job, backend="pytorchjob", timeout_s=60, log=lambda line: None)
    assert operator.check()["metadata"]["namespace"] == NAMESPACE
    assert emulator.get_job(job.name) is None


def test_no_cluster_configuration_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no Kubernetes configuration"):
        launch(_job(), backend="pytorchjob")


# ------------------------------------------------------------------------------ local backend


def _local_job(out: Path, data: Path, *extra: str, procs: int = 1) -> PretrainJob:
    args = ["--data", str(data), "--out", str(out), "--device", "cpu", *TINY_PRETRAIN, "--epochs", "1", "--batch-size", "48", *extra]
    return PretrainJob(name="local-run", image="unused", simclr_args=args, procs_per_node=procs, env={"OMP_NUM_THREADS": "1"})


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((l for l in (entry / "status").read_text().splitlines() if l.startswith("State:")), "")
            except OSError:
                continue
            if marker in cmdline and "zombie" not in state:
                pids.append(int(entry.name))
    return pids


def _all_gone(marker: str, timeout_s: float = 10.0) -> list[int]:
    """Wait until no live process mentions ``marker`` (SIGKILL takes effect asynchronously,
    slower on a loaded machine); return those still alive."""
    deadline = time.monotonic() + timeout_s
    while (alive := _processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.multiproc
def test_local_backend_runs_torchrun_with_two_processes(tiny_prepared, tmp_path):
    lines: list[str] = []
    launch(_local_job(tmp_path / "run", tiny_prepared, procs=2), backend="local", timeout_s=300, log=lines.append)
    assert (tmp_path / "run" / "model.pt").is_file()
    assert any("2 process(es)" in line for line in lines), "\n".join(lines)
    assert any("--nproc-per-node 2" in line for line in lines)


def test_local_backend_failure_carries_the_exit_code(tmp_path):
    job = _local_job(tmp_path / "run", tmp_path / "no-such-dataset")
    lines: list[str] = []
    with pytest.raises(LaunchError, match="exited with code 1") as caught:
        launch(job, backend="local", timeout_s=120, log=lines.append)
    assert caught.value.exit_code == 1 and caught.value.reason == "ExitCode"
    assert any("no-such-dataset" in line for line in lines)  # simclr's own message reached the log


def test_local_backend_refuses_several_nodes(tmp_path):
    job = _local_job(tmp_path / "run", tmp_path)
    job.num_nodes = 2
    with pytest.raises(LaunchError, match="num_nodes must be 1"):
        launch(job, backend="local")


def test_local_backend_timeout_kills_the_process_group(tiny_prepared, tmp_path):
    out = tmp_path / "timeout-run"
    job = _local_job(out, tiny_prepared, "--epochs", "100000")
    most, running = [0], threading.Event()

    def count_processes():  # torchrun and its worker, while the launcher waits
        while not running.wait(0.2):
            most[0] = max(most[0], len(_processes_mentioning(str(out))))

    counter = threading.Thread(target=count_processes, daemon=True)
    counter.start()
    with pytest.raises(LaunchError, match="did not finish within 10 s \\(timeout\\)") as caught:
        launch(job, backend="local", timeout_s=10, log=lambda line: None)
    running.set()
    counter.join()
    assert caught.value.reason == "Timeout"
    assert most[0] >= 2, "the worker never started: the test proves nothing"
    assert _all_gone(str(out)) == []


@pytest.mark.multiproc
def test_sigterm_stops_the_local_run(tiny_prepared, tmp_path):
    out = tmp_path / "cancelled-run"
    script = textwrap.dedent("""
        import json, os
        from components.launcher import PretrainJob, launch
        job = PretrainJob(**json.loads(os.environ["LAUNCHER_TEST_JOB"]))
        launch(job, backend="local", log=lambda line: print(line, flush=True))
    """)
    job = _local_job(out, tiny_prepared, "--epochs", "100000", procs=2)
    spec = {"name": job.name, "image": job.image, "simclr_args": job.simclr_args, "procs_per_node": 2, "env": job.env}
    env = {**os.environ, "LAUNCHER_TEST_JOB": json.dumps(spec)}  # the marker stays out of this command line
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(_processes_mentioning(str(out))) >= 3 or process.poll() is not None, "torchrun and its two workers", timeout_s=120)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1 and "received SIGTERM" in stderr
    assert _all_gone(str(out)) == []


# ------------------------------------------------------------------------------ the run's identity and the volume


def _in_pod(monkeypatch, pod_name: str) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KFP_POD_NAME", pod_name)
    monkeypatch.delenv("SIMCLR_RUN_ID", raising=False)
    monkeypatch.setattr("components.launcher.run_identity.resolve_namespace", lambda namespace: namespace or NAMESPACE)


@pytest.mark.parametrize("labels,expected", [
    ({"pipeline/runid": "5f0c6e1e-aaaa", "workflows.argoproj.io/workflow": "simclr-x7k2p"}, "5f0c6e1e-aaaa"),
    ({"workflows.argoproj.io/workflow": "simclr-x7k2p"}, "simclr-x7k2p"),  # Argo's label, on every backend
    ({}, "simclr-x7k2p-system-container-impl-1"),  # neither: the pod's name, with a warning
])
def test_the_run_id_comes_from_the_step_pods_labels(emulator, monkeypatch, labels, expected):
    from components.launcher import pipeline_run_id

    pod = "simclr-x7k2p-system-container-impl-1"
    emulator.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": pod, "namespace": NAMESPACE, "labels": labels}})
    _in_pod(monkeypatch, pod)
    lines: list[str] = []
    assert pipeline_run_id(emulator.api_client, log=lines.append) == expected
    assert bool(lines) == (not labels)
    # two attempts of a step (two pods of the same workflow) give the same job name; another run another
    if labels:
        retry = f"{pod}-retry"
        emulator.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": retry, "namespace": NAMESPACE, "labels": labels}})
        monkeypatch.setenv("KFP_POD_NAME", retry)
        assert job_name_for(pipeline_run_id(emulator.api_client, log=lines.append)) == job_name_for(expected)


def test_the_run_id_outside_a_cluster_and_when_the_pod_cannot_be_read(emulator, monkeypatch):
    from components.launcher import pipeline_run_id

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("SIMCLR_RUN_ID", raising=False)
    assert pipeline_run_id(emulator.api_client) == ""
    monkeypatch.setenv("SIMCLR_RUN_ID", "my-run")
    assert pipeline_run_id(emulator.api_client) == "my-run"
    _in_pod(monkeypatch, "no-such-pod")  # 404 here; a 403 (no 'get' on pods) takes the same path
    lines: list[str] = []
    assert pipeline_run_id(emulator.api_client, log=lines.append) == "no-such-pod"
    assert "cannot read pod team-a/no-such-pod" in lines[0] and "needs 'get' on pods" in lines[0]


def test_the_dataset_is_staged_once_per_run_on_the_volume(tiny_prepared, tmp_path):
    from components.launcher import stage_on_volume

    volume = tmp_path / "volume"
    volume.mkdir()
    lines: list[str] = []
    stage = stage_on_volume(str(tiny_prepared), "simclr-data", str(volume), "simclr-pretrain-run-a", log=lines.append)
    assert stage == str(volume / "pipeline-runs" / "simclr-pretrain-run-a")
    assert sorted(p.name for p in Path(stage, "data").iterdir()) == sorted(p.name for p in tiny_prepared.iterdir())
    # a retried step resumes: the staged copy stays as it is
    (Path(stage) / "data" / "marker").write_text("kept")
    assert stage_on_volume(str(tiny_prepared), "simclr-data", str(volume), "simclr-pretrain-run-a", log=lines.append) == stage
    assert (Path(stage) / "data" / "marker").exists() and "resuming this run" in lines[-1]
    # another run gets its own directory
    other = stage_on_volume(str(tiny_prepared), "simclr-data", str(volume), "simclr-pretrain-run-b", log=lines.append)
    assert other != stage and not (Path(other) / "data" / "marker").exists()
    with pytest.raises(LaunchError, match="need pvc_name"):
        stage_on_volume(str(tiny_prepared), "", str(volume), "x")
    with pytest.raises(LaunchError, match="not mounted at"):
        stage_on_volume(str(tiny_prepared), "simclr-data", str(tmp_path / "absent"), "x")


def test_a_volume_the_step_may_not_write_says_what_to_set():
    """A root-owned 0755 volume root (what NFS-like drivers that skip fsGroup leave), seen by
    the image's uid: the step fails with what to do, before copying anything."""
    import tempfile

    if os.getuid() != 0:
        pytest.skip("needs root to run the check as another uid")
    volume = Path(tempfile.mkdtemp(prefix="simclr-volume-"))  # under /tmp: reachable for any uid
    os.chmod(volume, 0o755)
    script = textwrap.dedent(f"""
        import os, sys
        from components.launcher import LaunchError, stage_on_volume  # before the switch: /root is not readable after it
        os.setgid(10001); os.setuid(10001)
        try:
            stage_on_volume("/nonexistent", "simclr-data", {str(volume)!r}, "run-a")
        except LaunchError as error:
            print(error.reason, error); sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("VolumeNotWritable cannot write to")
    assert "as uid 10001" in result.stdout and "belongs to uid 0" in result.stdout and "fsGroup" in result.stdout
    assert list(volume.iterdir()) == []
    volume.rmdir()


def test_a_finished_run_is_collected_into_the_artifact_and_its_directory_removed(tmp_path):
    from components.launcher import collect_from_volume

    def finished_run(name: str) -> Path:
        stage = tmp_path / "volume" / "pipeline-runs" / name
        (stage / "pretrain" / "live").mkdir(parents=True)
        (stage / "pretrain" / "model.pt").write_bytes(b"weights")
        (stage / "pretrain" / "live" / "metrics.json").write_text('{"epoch": 2}')
        (stage / "data").mkdir()
        return stage

    stage = finished_run("run-a")
    collect_from_volume(str(stage), str(tmp_path / "model"), log=lambda line: None)
    assert (tmp_path / "model" / "model.pt").read_bytes() == b"weights"
    assert (tmp_path / "model" / "live" / "metrics.json").read_text() == '{"epoch": 2}'
    assert not stage.exists()
    kept = finished_run("run-b")
    collect_from_volume(str(kept), str(tmp_path / "model-b"), keep=True, log=lambda line: None)
    assert (kept / "pretrain" / "model.pt").exists() and (tmp_path / "model-b" / "model.pt").exists()


def test_the_launchers_trainer_command_runs_as_its_pod_would(tiny_prepared, tmp_path):
    """The container the launcher builds, run as the operator runs a pod: its command, its env,
    the rendezvous variables and the PVC mount (here a local directory), two processes."""
    import shutil

    from simclr_core.checkpoint import load_checkpoint
    from tests.multiproc import free_port
    from tests.pods import run_like_a_pod

    volume = tmp_path / "volume"
    shutil.copytree(tiny_prepared, volume / "data")
    job = _job(simclr_args=["--data", "/mnt/simclr/data", "--out", "/mnt/simclr/run"], procs_per_node=2, gpus_per_node=0)
    obj = build_pytorchjob(job, NAMESPACE)
    (container,) = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = run_like_a_pod(container, int(obj["spec"]["nprocPerNode"]), {"/mnt/simclr": volume, "/tmp": tmp},
                            [*TINY_PRETRAIN, "--epochs", "1", "--metrics-port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    assert load_checkpoint(volume / "run" / "model.pt")["step"] == 3


def test_a_staging_pod_copies_the_dataset_once_and_trains_from_the_copy(tiny_prepared, tmp_path):
    """The launcher's container with staging on, run as a pod: its two processes stage the dataset
    from the PVC (a local directory) into the emptyDir (another), one copying while the other waits."""
    import filecmp
    import shutil

    from simclr_core.checkpoint import load_checkpoint
    from simclr_core.staging import staged_name
    from tests.multiproc import free_port
    from tests.pods import run_like_a_pod

    volume, tmp, stage = tmp_path / "volume", tmp_path / "tmp", tmp_path / "stage"
    shutil.copytree(tiny_prepared, volume / "data")
    tmp.mkdir()
    stage.mkdir()
    job = _job(simclr_args=["--data", "/mnt/simclr/data", "--out", "/mnt/simclr/run"], procs_per_node=2, gpus_per_node=0, stage_size="1Gi")
    obj = build_pytorchjob(job, NAMESPACE)
    (container,) = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    result = run_like_a_pod(container, 2, {"/mnt/simclr": volume, "/tmp": tmp, "/stage": stage},
                            [*TINY_PRETRAIN, "--epochs", "1", "--metrics-port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    staged = stage / staged_name((tiny_prepared / "manifest.json").read_bytes())
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in tiny_prepared.iterdir())
    assert all(filecmp.cmp(tiny_prepared / p.name, p, shallow=False) for p in staged.iterdir())
    assert result.stderr.count("staging: copying") == 1  # one process copied; the other found the copy
    assert result.stderr.count(f"training reads the staged copy {staged}") == 2
    assert load_checkpoint(volume / "run" / "model.pt")["step"] == 3
