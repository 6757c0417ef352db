"""manifests/ against the real tools: kustomize (kubectl's), the Kubernetes schemas
(kubernetes-validate, offline), the PyTorchJob CRD's openAPIV3Schema, the Prometheus
operator's PodMonitor types, and the checkov security scanner."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.launcher.core import PretrainJob
from components.launcher.podspec import trainer_command
from components.launcher.pytorchjob import METRICS_PORT, SCRAPED_LOCAL_RANKS, metrics_port_name
from tests.tools import failed_checks, run_checkov, skipped_checks, tools_python

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
# ../shared/schemas beside the clone (CI and the development machines have it).
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
PYTORCHJOB_CRD = SCHEMAS / "kubeflow.org_pytorchjobs.yaml"

# The Kubernetes release the core kinds are validated against (the oldest kubernetes-validate
# ships; the manifests use nothing newer).
KUBERNETES_VERSION = "1.32.0"
IMAGE = "ghcr.io/simclr-kubeflow/simclr:0.1.0"
UID = 10001  # the Dockerfile's SIMCLR_UID
TRAINER_LABEL = {"app.kubernetes.io/name": "simclr-pretrain"}  # what the launcher puts on its pods

# Every checkov check the manifests skip, with an annotation that says why (README of the
# review: a new skip needs a reason there and an entry here).
ALLOWED_K8S_SKIPS = {
    "CKV_K8S_8",   # liveness probe: batch training pods, the operator restarts failed ones
    "CKV_K8S_9",   # readiness probe: no Service sends traffic to training pods
    "CKV_K8S_43",  # image digest: the user's own image; pinned by kustomization.yaml images:
}


# ------------------------------------------------------------------------------ loading


def _kustomization() -> dict:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


def _resources() -> dict[str, list[dict]]:
    """file name -> the objects it holds, for every resource the kustomization lists."""
    return {
        name: [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]
        for name in _kustomization()["resources"]
    }


def _objects() -> list[dict]:
    return [doc for docs in _resources().values() for doc in docs]


def _one(kind: str, name: str | None = None) -> dict:
    found = [o for o in _objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _trainer_command() -> list[str]:
    """The standalone PyTorchJob's trainer command (manifests/pytorchjob.yaml)."""
    (container,) = _one("PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return container["command"]


def _simclr_args(command: list[str]) -> list[str]:
    """What a trainer command passes to `simclr pretrain` after the launcher's own --metrics-port."""
    return command[command.index("pretrain") + 3:]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` (or `kustomize build DIR`), parsed."""
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed (apt-get install kubectl)")
    command = [*command, str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _pod_specs(obj: dict) -> dict[str, dict]:
    """role -> pod template of a PyTorchJob, or of a Job."""
    if obj["kind"] == "PyTorchJob":
        return {role: spec["template"] for role, spec in obj["spec"]["pytorchReplicaSpecs"].items()}
    if obj["kind"] == "Job":
        return {"job": obj["spec"]["template"]}
    return {}


def _as_pods(obj: dict) -> list[dict]:
    """The Pods a PyTorchJob's replica templates become (what checkov and the API check)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{obj['metadata']['name']}-{role.lower()}-0",
                "namespace": obj["metadata"].get("namespace", "default"),
                **copy.deepcopy(template.get("metadata", {})),
            },
            "spec": {**copy.deepcopy(template["spec"]), "restartPolicy": obj["spec"]["pytorchReplicaSpecs"][role]["restartPolicy"]},
        }
        for role, template in _pod_specs(obj).items()
    ]


def _strict(schema):
    """A copy of a CRD schema that rejects unknown fields, as the API server does for a
    structural schema under `kubectl apply` (field validation Strict, kubectl >= 1.27)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _pytorchjob_schema() -> dict:
    assert PYTORCHJOB_CRD.is_file(), f"the PyTorchJob CRD is missing: {PYTORCHJOB_CRD} (../shared/schemas beside the clone)"
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


# ------------------------------------------------------------------------------ kustomize


OPERATOR_FILES = ("pytorchjob.yaml", "trainjob.yaml")  # the kustomization lists one of the two


def test_kustomization_lists_every_manifest_and_each_exists():
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    for name in listed:
        assert (MANIFESTS / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    assert len(set(OPERATOR_FILES) & set(listed)) == 1, "list exactly one of pytorchjob.yaml and trainjob.yaml"
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml", *_kustomization()["configurations"]}
    assert on_disk == set(listed) | set(OPERATOR_FILES), f"manifests not in kustomization.yaml: {sorted(on_disk - set(listed))}"
    for name, docs in _resources().items():
        assert docs, f"{name} holds no object"


def test_kustomize_build_renders_every_object_into_one_namespace():
    built = _kustomize(MANIFESTS)
    namespace = _kustomization()["namespace"]
    key = lambda o: (o["apiVersion"], o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, built)) == sorted(map(key, _objects()))
    for obj in built:
        assert obj["metadata"]["namespace"] == namespace, key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "simclr-kubeflow", key(obj)
        for template in _pod_specs(obj).values():
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                assert container["image"] == IMAGE, (key(obj), container["name"])
    binding = next(o for o in built if o["kind"] == "RoleBinding")
    assert binding["subjects"][0]["namespace"] == namespace


def test_an_overlay_retargets_the_image_and_namespace_of_every_object(tmp_path):
    """What the kustomization's comments tell users to do reaches the PyTorchJob's containers
    too (kustomize's image transformer must find them in a custom resource)."""
    digest = "sha256:" + "0" * 64
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "team-a",
        "resources": [os.path.relpath(MANIFESTS, tmp_path)],
        "images": [{"name": "ghcr.io/simclr-kubeflow/simclr", "newName": "registry.example.com/simclr", "digest": digest}],
    }))
    built = _kustomize(tmp_path)
    images = [
        container["image"]
        for obj in built
        for template in _pod_specs(obj).values()
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]
    ]
    assert len(images) == 5  # prepare; Master and Worker: wait-for-data + pytorch
    assert set(images) == {f"registry.example.com/simclr@{digest}"}
    assert {o["metadata"]["namespace"] for o in built} == {"team-a"}
    binding = next(o for o in built if o["kind"] == "RoleBinding")
    assert binding["subjects"][0]["namespace"] == "team-a"


# ------------------------------------------------------------------------------ schemas


CORE_API_VERSIONS = {"v1", "rbac.authorization.k8s.io/v1", "batch/v1", "networking.k8s.io/v1"}


@pytest.mark.parametrize("name", sorted(_kustomization()["resources"]))
def test_core_objects_validate_against_the_kubernetes_schemas(name):
    """kubernetes-validate, strict (unknown fields are errors), for a pinned release; the
    PyTorchJob's replica templates are validated as the Pods they become."""
    for obj in _resources()[name]:
        if obj["apiVersion"] in CORE_API_VERSIONS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        elif obj["kind"] == "PyTorchJob":
            for pod in _as_pods(obj):
                kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        else:
            assert obj["kind"] == "PodMonitor", f"{name}: {obj['kind']} is validated nowhere"


def test_kubernetes_validate_would_catch_a_typo():
    """The control for the test above: strict validation rejects an unknown field."""
    pvc = copy.deepcopy(_one("PersistentVolumeClaim"))
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES_VERSION, strict=True)
    job = copy.deepcopy(_one("PyTorchJob"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        for pod in _as_pods(job):
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_pytorchjob_validates_against_the_crd_schema():
    schema = _pytorchjob_schema()
    job = _one("PyTorchJob")
    for validator_schema in (schema, _strict(schema)):
        errors = sorted(jsonschema.Draft7Validator(validator_schema).iter_errors(job), key=str)
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_crd_schema_would_catch_mistakes():
    schema = _pytorchjob_schema()
    strict = jsonschema.Draft7Validator(_strict(schema))
    plain = jsonschema.Draft7Validator(schema)
    job = copy.deepcopy(_one("PyTorchJob"))
    job["spec"]["nprocPerNode"] = 1  # a string in the CRD
    assert list(plain.iter_errors(job))
    job = copy.deepcopy(_one("PyTorchJob"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"  # an integer
    assert list(plain.iter_errors(job))
    job = copy.deepcopy(_one("PyTorchJob"))
    del job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]  # required
    assert list(plain.iter_errors(job))
    job = copy.deepcopy(_one("PyTorchJob"))
    job["spec"]["nprocsPerNode"] = job["spec"].pop("nprocPerNode")  # pruned by the server
    assert not list(plain.iter_errors(job)) and list(strict.iter_errors(job))


# A PodMonitor checked by the Prometheus operator's own types (generated from its CRDs, in
# .venv-tools): pydantic rejects wrong types and values, and the round trip through the model
# must give back every field (a field the CRD does not know would be dropped).
_PODMONITOR_CHECK = """
import json, sys
from cloudcoil.models.prometheus_operator.v1 import PodMonitor
results = []
for doc in json.load(sys.stdin):
    try:
        back = PodMonitor.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
        results.append("ok" if back == doc else "unknown fields: " + json.dumps(back) + " != " + json.dumps(doc))
    except Exception as error:
        results.append(str(error))
print(json.dumps(results))
"""


def _check_podmonitors(docs: list[dict]) -> list[str]:
    result = subprocess.run(
        [str(tools_python()), "-c", _PODMONITOR_CHECK], input=json.dumps(docs), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_podmonitor_validates_against_the_prometheus_operator_types():
    monitor = _one("PodMonitor")
    typo = copy.deepcopy(monitor)
    typo["spec"]["podMetricEndpoints"] = typo["spec"].pop("podMetricsEndpoints")
    wrong_type = copy.deepcopy(monitor)
    wrong_type["spec"]["podMetricsEndpoints"][0]["scheme"] = "tcp"
    ok, typo_result, wrong_type_result = _check_podmonitors([monitor, typo, wrong_type])
    assert ok == "ok", ok
    assert typo_result.startswith("unknown fields"), typo_result  # the controls: both caught
    assert "scheme" in wrong_type_result, wrong_type_result


# ------------------------------------------------------------------------------ what they say


def test_podmonitor_scrapes_the_trainer_pods_metrics_port():
    monitor = _one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {"matchLabels": TRAINER_LABEL}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [(metrics_port_name(k), "/metrics") for k in range(SCRAPED_LOCAL_RANKS)]
    for template in _pod_specs(_one("PyTorchJob")).values():
        labels = template["metadata"]["labels"]
        assert TRAINER_LABEL.items() <= labels.items()
        (container,) = template["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
        command = container["command"]
        assert command[command.index("--metrics-port") + 1] == "9090"  # the trainer serves on that port


def test_rbac_grants_exactly_the_two_job_kinds_and_pod_reads_in_one_namespace():
    role = _one("Role", "simclr-pipeline")
    rules = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]
    }
    expected = {("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "list", "watch", "delete", "patch")}
    expected |= {("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "list", "watch", "delete", "patch")}
    expected |= {("", r, v) for r in ("pods", "pods/log") for v in ("get", "list", "watch")}
    assert rules == expected
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs"
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
    binding = _one("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "simclr-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simclr-pipeline", "namespace": role["metadata"]["namespace"]}]
    kinds = [o["kind"] for o in _objects()]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert kinds.count("Role") == 1 and kinds.count("RoleBinding") == 1
    assert _one("ServiceAccount", "simclr-pipeline").get("automountServiceAccountToken", True) is True
    # The trainer's account gets nothing: no binding, no token.
    assert _one("ServiceAccount", "simclr-trainer")["automountServiceAccountToken"] is False


def test_pvc_is_shared_by_every_node():
    pvc = _one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    size = pvc["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and int(size[:-2]) >= 20


def _containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


@pytest.mark.parametrize("kind", ["PyTorchJob", "Job"])
def test_every_pod_runs_locked_down(kind):
    """Non-root (the image's numeric user), no privilege escalation, read-only root
    filesystem, no capabilities, RuntimeDefault seccomp, requests and limits, no API token."""
    pvc = _one("PersistentVolumeClaim")["metadata"]["name"]
    for role, template in _pod_specs(_one(kind)).items():
        spec = template["spec"]
        assert spec["serviceAccountName"] == "simclr-trainer" and spec["automountServiceAccountToken"] is False
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == UID
        assert pod_security["fsGroup"] == UID and pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in _containers(template):
            where = (kind, role, container["name"])
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] == UID, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert security.get("privileged", False) is False, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (where, bound)
            assert container["image"] == IMAGE, where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (where, mount)
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc


def test_pytorchjob_is_a_two_node_torchrun_of_simclr_pretrain():
    job = _one("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    assert isinstance(spec["nprocPerNode"], str) and spec["nprocPerNode"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    # One pod template for every node (the file spells it out twice).
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    template = replicas["Master"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["name"] == "pytorch"  # the Training Operator looks for this name
    # what the command does is tested by running it (test_the_pytorchjobs_trainer_command_runs_as_its_pod_would);
    # here: it is the launcher's trainer command (restarts, rendezvous, metrics port) for the same arguments
    command = container["command"]
    launcher_job = PretrainJob(name=job["metadata"]["name"], image=IMAGE, simclr_args=_simclr_args(command))
    launcher_job.max_restarts = int(_option(command, "--max-restarts"))
    assert command == trainer_command(launcher_job) and "args" not in container
    assert _option(command, "--metrics-port") == str(METRICS_PORT)  # the port the PodMonitor scrapes
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/mnt/simclr": "data", "/dev/shm": "dshm", "/tmp": "tmp", "/stage": "stage"}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["tmp"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HOME"].startswith("/tmp")  # writable with a read-only root filesystem


def test_the_manifests_stage_volume_is_where_the_commented_flag_and_the_launcher_stage():
    """Both trainer pods have the `stage` emptyDir (sized, on the node's disk) at the path the
    commented-out `--stage-dir` names and the launcher mounts its own staging volume at."""
    from components.launcher.podspec import STAGE_VOLUME

    launcher_path = PretrainJob(name="x", image=IMAGE, simclr_args=[]).stage_mount_path
    pods = {"pytorchjob.yaml": _pod_specs(_one("PyTorchJob"))["Master"], "trainjob.yaml": _trainjob_pod(_trainjob())}
    for file_name, pod in pods.items():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        (container,) = pod["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[STAGE_VOLUME] == launcher_path, file_name
        assert set(volumes[STAGE_VOLUME]["emptyDir"]) == {"sizeLimit"}, file_name  # not medium Memory: the node's disk
        text = (MANIFESTS / file_name).read_text()
        assert re.search(rf"# - --stage-dir\n\s*# - {re.escape(launcher_path)}\n", text), file_name


def test_the_pytorchjobs_trainer_command_runs_as_its_pod_would(tiny_prepared, tmp_path):
    """Not compared with a copy: the manifest's own command runs (torchrun --no-python simclr
    pretrain ...) with its env, the operator's rendezvous variables and the PVC's mount path
    on a local directory, on a tiny dataset copied where prepare-job.yaml writes it."""
    import shutil

    from simclr_core.checkpoint import load_checkpoint
    from tests.conftest import TINY_PRETRAIN
    from tests.multiproc import free_port
    from tests.pods import run_like_a_pod

    job = _one("PyTorchJob")
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    volume = tmp_path / "volume"
    data_dir = _option(container["command"], "--data")
    shutil.copytree(tiny_prepared, volume / Path(data_dir).relative_to(mount))
    tmp = tmp_path / "tmp"  # the pod's /tmp emptyDir (HOME and the caches point there)
    tmp.mkdir()
    result = run_like_a_pod(container, int(job["spec"]["nprocPerNode"]), {mount: volume, "/tmp": tmp},
                            [*TINY_PRETRAIN, "--epochs", "1", "--metrics-port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = _option(container["command"], "--out")
    model = load_checkpoint(volume / Path(out_dir).relative_to(mount) / "model.pt")
    assert model["step"] == 3  # 54 images, batch 16: one epoch


# ------------------------------------------------------------------------------ the TrainJob


def _trainjob() -> dict:
    (obj,) = [doc for doc in yaml.safe_load_all((MANIFESTS / "trainjob.yaml").read_text()) if doc]
    return obj


def _trainjob_pod(obj: dict) -> dict:
    (patch,) = obj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]


def test_trainjob_validates_strictly_against_the_trainer_v2_3_crd():
    crd = yaml.safe_load((SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft7Validator(_strict(schema))
    obj = _trainjob()
    assert [error.message for error in validator.iter_errors(obj)] == []
    assert obj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    # the same trainer command as the launcher's, and the same pod as the PyTorchJob's
    command = obj["spec"]["trainer"]["command"]
    launcher_job = PretrainJob(name=obj["metadata"]["name"], image=IMAGE, simclr_args=_simclr_args(command))
    assert command == trainer_command(launcher_job) and _simclr_args(command) == _simclr_args(_trainer_command())
    pod = _trainjob_pod(obj)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"
    (pytorchjob_container,) = _pod_specs(_one("PyTorchJob"))["Master"]["spec"]["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {m["mountPath"] for m in pytorchjob_container["volumeMounts"]}
    assert container["securityContext"] == pytorchjob_container["securityContext"]
    assert pod["metadata"]["labels"].items() >= TRAINER_LABEL.items()
    assert pod["spec"]["serviceAccountName"] == "simclr-trainer"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]


def test_an_overlay_selects_the_trainjob_and_retargets_its_image(tmp_path):
    """Switching the kustomization to trainjob.yaml renders a TrainJob (no PyTorchJob) whose
    spec.trainer.image follows `images:` (kustomizeconfig.yaml teaches kustomize that field)."""
    selected = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, selected)
    kustomization = _kustomization()
    kustomization["resources"] = ["trainjob.yaml" if name == "pytorchjob.yaml" else name for name in kustomization["resources"]]
    kustomization["images"] = [{"name": "ghcr.io/simclr-kubeflow/simclr", "newName": "registry.example.com/simclr", "newTag": "1.2"}]
    (selected / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = _kustomize(selected)
    kinds = [obj["kind"] for obj in built]
    assert "TrainJob" in kinds and "PyTorchJob" not in kinds
    trainjob = next(obj for obj in built if obj["kind"] == "TrainJob")
    assert trainjob["spec"]["trainer"]["image"] == "registry.example.com/simclr:1.2"
    assert trainjob["metadata"]["namespace"] == kustomization["namespace"]


def test_the_trainjobs_trainer_command_runs_as_its_pod_would(tiny_prepared, tmp_path):
    """The TrainJob's trainer (command, env) in its patched container (mounts), run with the
    runtime's PET_* variables and the mount paths on local directories."""
    from simclr_core.checkpoint import load_checkpoint
    from tests.conftest import TINY_PRETRAIN
    from tests.multiproc import free_port
    from tests.pods import run_like_a_pod

    obj = _trainjob()
    trainer, (patched,) = obj["spec"]["trainer"], _trainjob_pod(obj)["spec"]["containers"]
    container = {"command": trainer["command"], "env": trainer["env"], "volumeMounts": patched["volumeMounts"]}
    volume = tmp_path / "volume"
    shutil.copytree(tiny_prepared, volume / "data" / "prepared")
    (tmp_path / "tmp").mkdir()
    result = run_like_a_pod(container, trainer["numProcPerNode"], {"/mnt/simclr": volume, "/tmp": tmp_path / "tmp"},
                            [*TINY_PRETRAIN, "--epochs", "1", "--metrics-port", str(free_port())])
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(volume / "runs" / "pretrain" / "model.pt")["step"] == 3


def test_prepare_job_writes_where_pretraining_reads():
    (container,) = _one("Job", "simclr-prepare")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["simclr", "prepare"]
    out = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--out=")]
    assert out == [_option(_trainer_command(), "--data")]
    (wait,) = _one("PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["initContainers"]
    assert f"{out[0]}/manifest.json" in wait["args"][0]


def test_network_policies_select_the_pods_they_protect():
    policies = {o["metadata"]["name"]: o for o in _objects() if o["kind"] == "NetworkPolicy"}
    trainer = policies["simclr-pretrain"]["spec"]
    assert trainer["podSelector"] == {"matchLabels": TRAINER_LABEL}
    peers, metrics = trainer["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": TRAINER_LABEL}}]}
    (ports,) = metrics["ports"]  # every local rank's metrics port the PodMonitor scrapes, and no other
    assert (ports["protocol"], ports["port"], ports["endPort"]) == ("TCP", METRICS_PORT, METRICS_PORT + SCRAPED_LOCAL_RANKS - 1)
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"]
    prepare = policies["simclr-prepare"]["spec"]
    assert prepare["podSelector"]["matchLabels"].items() <= job_labels.items()
    assert "ingress" not in prepare and prepare["policyTypes"] == ["Ingress"]


def test_the_manifests_cover_the_pods_the_pipelines_launcher_creates():
    """The PyTorchJobs the pretrain step creates (components/launcher) are scraped by the
    PodMonitor, admitted by the NetworkPolicy, run as the image's user and mount this PVC."""
    from components.launcher.core import PretrainJob
    from components.launcher.pytorchjob import build_pytorchjob

    pvc = _one("PersistentVolumeClaim")["metadata"]["name"]
    job = build_pytorchjob(
        PretrainJob(name="simclr-run-1", image=IMAGE, simclr_args=_simclr_args(_trainer_command()), num_nodes=3, pvc_name=pvc),
        namespace=_kustomization()["namespace"],
    )
    monitor = _one("PodMonitor")["spec"]
    policy = _one("NetworkPolicy", "simclr-pretrain")["spec"]
    pods = _as_pods(job)
    assert len(pods) == 2  # Master, Worker (x2)
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert monitor["selector"]["matchLabels"].items() <= labels.items()
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        (container,) = pod["spec"]["containers"]
        assert any(p["name"] == monitor["podMetricsEndpoints"][0]["port"] and p["containerPort"] == 9090 for p in container["ports"])
        assert pod["spec"]["securityContext"]["runAsUser"] == UID
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [pvc]
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------------ checkov


def _assert_clean(report: dict, allowed_skips: set[str]) -> None:
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    assert not failed_checks(report), "checkov found:\n" + "\n".join(failed_checks(report))
    skipped = skipped_checks(report)
    assert set(skipped) <= allowed_skips, f"skipped without a test entry: {set(skipped) - allowed_skips}"
    for check_id, reasons in skipped.items():
        for reason in reasons:
            assert len(reason) > 30 and reason != "No comment provided", (check_id, reason)


def test_checkov_passes_on_the_manifests():
    """`checkov -d manifests --framework kubernetes`, as a user or CI would run it."""
    report = run_checkov("-d", str(MANIFESTS.relative_to(ROOT)), "--framework", "kubernetes")
    _assert_clean(report, ALLOWED_K8S_SKIPS)
    assert report["summary"]["passed"] >= 90, report["summary"]  # the Job alone has ~80 checks


def test_checkov_passes_on_the_pytorchjob_pods(tmp_path):
    """checkov does not look inside a custom resource, so the kustomize-built manifests are
    scanned with each PyTorchJob replaced by the Pods its replica templates become (beside the
    NetworkPolicies that must select them)."""
    # What kubectl applies; without kustomize, the files (each names its namespace too).
    built = _kustomize(MANIFESTS) if _kustomize_command() else _objects()
    rendered = []
    for obj in built:
        rendered.extend(_as_pods(obj) if obj["kind"] == "PyTorchJob" else [obj])
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(rendered, sort_keys=False))
    report = run_checkov("-f", str(tmp_path / "rendered.yaml"), "--framework", "kubernetes")
    _assert_clean(report, ALLOWED_K8S_SKIPS)
    pod_checks = [c for c in report["results"]["passed_checks"] if c["resource"].startswith("Pod.")]
    assert len({c["check_id"] for c in pod_checks}) >= 60, "checkov did not scan the replica Pods"
    assert {c["resource"].split(".")[2] for c in pod_checks} >= {"simclr-pretrain-master-0", "simclr-pretrain-worker-0"}
