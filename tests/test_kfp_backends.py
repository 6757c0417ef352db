"""The compiled pipeline against what each supported Kubeflow Pipelines backend parses.

Facts from kubeflow/pipelines' source (README: supported versions):
- the 2.2/2.3 drivers unmarshal a step's Kubernetes executor config strictly (jsonpb without
  AllowUnknownFields): a field their kfp-kubernetes proto lacks fails the step; 2.4.1 and
  later drop unknown fields;
- before 2.4.0 the deployment spec is read tolerantly, so a resource given by a parameter
  placeholder (``resourceCpuLimit``, ``accelerator.resourceCount``) is dropped without a word;
- the driver resolves such a placeholder with the parameter's *string* value.

The definitions are the kfp-pipeline-spec and kfp-kubernetes releases of each backend's time,
kept by scripts/fetch_protos.py under .venv-tools/protos/. They are loaded in a subprocess,
since this process has the current releases registered under the same protobuf names.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.kubernetes import kubernetes_executor_config_pb2

from pipelines.compile import PIPELINE_FILE, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / ".venv-tools" / "protos"
KUBERNETES_PROTO = {"2.2": "kfp-kubernetes-1.2.0", "2.3": "kfp-kubernetes-1.3.0", "2.4": "kfp-kubernetes-1.4.0"}
PIPELINE_SPEC_PROTO = {"2.2": "kfp-pipeline-spec-0.3.0", "2.3": "kfp-pipeline-spec-0.3.0", "2.4": "kfp-pipeline-spec-0.6.0"}

_PARSER = r"""
import importlib.util, json, sys
from google.protobuf import json_format
path, message, strict = sys.argv[1], sys.argv[2], sys.argv[3] == "strict"
spec = importlib.util.spec_from_file_location("old_pb2", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cls = module
for part in message.split("."):
    cls = getattr(cls, part)
results = []
for document in json.load(sys.stdin):
    try:
        parsed = json_format.ParseDict(document, cls(), ignore_unknown_fields=not strict)
        results.append({"ok": True, "value": json_format.MessageToDict(parsed)})
    except json_format.ParseError as error:
        results.append({"ok": False, "error": str(error)})
print(json.dumps(results))
"""


def parse_with(release: str, module: str, message: str, documents: list[dict], strict: bool = True) -> list[dict]:
    """Parse ``documents`` as ``message`` with the protobuf module of an older release."""
    path = PROTOS / release / f"{module}.py"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash scripts/setup_tools.sh` (it keeps the old releases' definitions)")
    result = subprocess.run([sys.executable, "-c", _PARSER, str(path), message, "strict" if strict else "lenient"],
                            input=json.dumps(documents), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _documents(path: Path) -> tuple[dict, dict]:
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def _executor_configs(platform: dict) -> dict[str, dict]:
    return (platform.get("platforms") or {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """The checked-in pipeline and the compiles a README section tells users to make."""
    out = tmp_path_factory.mktemp("compiled")
    return {
        "checked-in": PIPELINE_FILE,
        "kfp-backend-2.3": compile_pipeline(out / "old.yaml", kfp_backend="2.3", compute={"eval_gpus": "1"}),
        "minio": compile_pipeline(out / "minio.yaml", s3_endpoint="http://minio-service.kubeflow:9000", s3_secret="mlpipeline-minio-artifact"),
    }


@pytest.mark.parametrize("backend", ["2.2", "2.3", "2.4"])
def test_kubernetes_config_parses_strictly_with_older_backends_definitions(variants, backend):
    for variant, path in variants.items():
        configs = _executor_configs(_documents(path)[1])
        assert configs, f"{variant}: no Kubernetes config (the PVC mount is expected)"
        results = parse_with(KUBERNETES_PROTO[backend], "kubernetes_executor_config_pb2", "KubernetesExecutorConfig", list(configs.values()))
        for executor, result in zip(configs, results):
            assert result["ok"], f"{variant} {executor} fails on KFP backend {backend}: {result['error']}"
            for mount in result["value"].get("pvcMount", []):  # the old driver finds the PVC name here
                assert mount["componentInputParameter"] == "pvc_name" and mount["mountPath"] == "/mnt/simclr"
        if variant == "minio":
            secrets = [s for result in results for s in result["value"].get("secretAsEnv", [])]
            assert secrets and all(s["secretName"] == "mlpipeline-minio-artifact" for s in secrets)


def test_kubernetes_config_parses_strictly_with_the_current_definitions(variants):
    for variant, path in variants.items():
        for executor, config in _executor_configs(_documents(path)[1]).items():
            json_format.ParseDict(config, kubernetes_executor_config_pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)


def test_the_strict_check_fails_on_what_kfp_kubernetes_writes_by_itself(tmp_path):
    """kfp-kubernetes' own output (pvcNameParameter beside the deprecated field) is what the
    2.2/2.3 drivers reject: the check above can fail."""
    from kfp import dsl, kubernetes

    @dsl.component(base_image="python:3.11")
    def step():
        pass

    @dsl.pipeline(name="raw")
    def raw(pvc_name: str = "simclr-data"):
        kubernetes.mount_pvc(step(), pvc_name=pvc_name, mount_path="/mnt/simclr")

    compiler.Compiler().compile(raw, str(tmp_path / "raw.yaml"))
    config = next(iter(_executor_configs(_documents(tmp_path / "raw.yaml")[1]).values()))
    (result,) = parse_with(KUBERNETES_PROTO["2.3"], "kubernetes_executor_config_pb2", "KubernetesExecutorConfig", [config])
    assert not result["ok"] and "pvcNameParameter" in result["error"]


@pytest.mark.parametrize("backend", ["2.2", "2.4"])
def test_pipeline_spec_parses_strictly_with_older_backends_definitions(variants, backend):
    for variant, path in variants.items():
        spec = dict(_documents(path)[0])
        spec.pop("deploymentSpec")  # a Struct in PipelineSpec, parsed on its own below
        (result,) = parse_with(PIPELINE_SPEC_PROTO[backend], "pipeline_spec_pb2", "PipelineSpec", [spec])
        assert result["ok"], f"{variant} on KFP backend {backend}: {result['error']}"


def _resources_seen_by(backend: str, path: Path) -> dict[str, dict]:
    """Each executor's resources as the backend's own definitions read them (tolerantly, as
    its compiler does: GetDeploymentConfig uses AllowUnknownFields)."""
    executors = _documents(path)[0]["deploymentSpec"]["executors"]
    results = parse_with(PIPELINE_SPEC_PROTO[backend], "pipeline_spec_pb2", "PipelineDeploymentConfig.ExecutorSpec",
                         list(executors.values()), strict=False)
    return {name: r["value"].get("container", {}).get("resources", {}) for name, r in zip(executors, results)}


def test_old_backends_see_step_compute_only_in_a_pipeline_compiled_for_them(variants):
    # The default compile gives compute as run parameters: a 2.3 backend sees none of it ...
    seen = _resources_seen_by("2.3", variants["checked-in"])
    for executor in ("exec-linear-eval", "exec-pretrain", "exec-prepare"):
        assert not {"cpuLimit", "cpuRequest", "memoryLimit", "memoryRequest"} & set(seen[executor])
        assert not seen[executor].get("accelerator")
    # ... and --kfp-backend 2.3 compiles it in, where that backend reads it.
    seen = _resources_seen_by("2.3", variants["kfp-backend-2.3"])
    assert seen["exec-linear-eval"]["cpuLimit"] == 4 and seen["exec-linear-eval"]["memoryLimit"] == pytest.approx(16 * 2**30 / 1e9)
    assert seen["exec-linear-eval"]["accelerator"] == {"type": "nvidia.com/gpu", "count": "1"}
    assert "accelerator" not in seen["exec-pretrain"]  # pretrain_gpus "0": none
    assert seen["exec-prepare"]["cpuLimit"] == 2
    parameters = _documents(variants["kfp-backend-2.3"])[0]["root"]["inputDefinitions"]["parameters"]
    assert "eval_gpus" not in parameters and "eval_cpu_limit" not in parameters  # not a knob that would be ignored


def test_resource_placeholders_name_string_parameters():
    """The driver resolves a resource placeholder with the parameter's string value; a number
    parameter would resolve to "" and the step would silently get no GPU."""
    spec, _ = _documents(PIPELINE_FILE)
    placeholder = re.compile(r"\{\{\$\.inputs\.parameters\['pipelinechannel--(\w+)'\]\}\}")
    kinds = spec["root"]["inputDefinitions"]["parameters"]
    found = set()
    for executor in spec["deploymentSpec"]["executors"].values():
        text = json.dumps(executor["container"].get("resources", {}))
        for name in placeholder.findall(text):
            found.add(name)
            assert kinds[name]["parameterType"] == "STRING", f"{name} is {kinds[name]['parameterType']}"
    assert {"eval_gpus", "pretrain_gpus", "eval_cpu_limit", "accelerator_type"} <= found
