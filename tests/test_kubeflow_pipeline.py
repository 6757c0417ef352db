"""The Kubeflow layer: component YAMLs, the compiled pipeline, kfp's local runner, submit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components, dsl

from components.common import DEFAULT_IMAGE, cli_options, confusion_matrix, flatten
from pipelines.compile import PIPELINE_FILE, compile_pipeline, stale_files
from pipelines.submit import UsageError, check_backend, parse_arguments, pipeline_parameters

REPO = Path(__file__).resolve().parents[1]
STEPS = ["prepare", "pretrain", "linear_eval", "finetune", "transfer"]


def _load_spec(path: Path) -> tuple[dict, dict]:
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def test_checked_in_yamls_match_the_code():
    assert stale_files() == [], "run `python -m pipelines.compile` and commit the YAMLs"


@pytest.mark.parametrize("step", STEPS)
def test_component_yaml_loads_with_its_typed_interface(step):
    component = components.load_component_from_file(str(REPO / "components" / step / "component.yaml"))
    spec = component.component_spec
    assert spec.implementation.container.image == DEFAULT_IMAGE
    assert spec.name == step.replace("_", "-")
    outputs = {name: output.type for name, output in (spec.outputs or {}).items()}
    expected_outputs = {
        "prepare": {"dataset": "system.Dataset@0.0.1"},
        "pretrain": {"model": "system.Model@0.0.1", "metrics": "system.Metrics@0.0.1", "report": "system.HTML@0.0.1"},
        "linear_eval": {"metrics": "system.Metrics@0.0.1", "confusion": "system.ClassificationMetrics@0.0.1"},
        "finetune": {"metrics": "system.Metrics@0.0.1"},
        "transfer": {"metrics": "system.Metrics@0.0.1"},
    }[step]
    assert outputs == expected_outputs
    if step != "prepare":
        assert spec.inputs["data"].type == "system.Dataset@0.0.1"
    assert "settings" in spec.inputs
    # the step's body calls the `simclr` CLI, nothing else
    assert "run_simclr" in " ".join(spec.implementation.container.command)


def test_a_loaded_component_works_in_a_users_own_pipeline(tmp_path):
    linear_eval = components.load_component_from_file(str(REPO / "components" / "linear_eval" / "component.yaml"))

    @dsl.pipeline(name="my-eval")
    def my_eval(model_uri: str):
        encoder = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        data = dsl.importer(artifact_uri="gs://my-bucket/prepared", artifact_class=dsl.Dataset)
        linear_eval(data=data.output, model=encoder.output, settings={"max_iter": 50})

    compiler.Compiler().compile(my_eval, str(tmp_path / "my_eval.yaml"))
    spec, _ = _load_spec(tmp_path / "my_eval.yaml")
    assert "linear-eval" in spec["root"]["dag"]["tasks"]


def _order(spec: dict) -> dict[str, set[str]]:
    return {name: set(task.get("dependentTasks", [])) for name, task in spec["root"]["dag"]["tasks"].items()}


def test_compiled_pipeline_chains_the_five_steps():
    spec, platform = _load_spec(PIPELINE_FILE)
    assert _order(spec) == {
        "prepare": set(), "prepare-2": set(), "pretrain": {"prepare"},
        "linear-eval": {"prepare", "pretrain"}, "finetune": {"prepare", "pretrain"}, "transfer": {"prepare-2", "pretrain"},
    }
    tasks = spec["root"]["dag"]["tasks"]
    for consumer, artifact, producer, key in (
        ("pretrain", "data", "prepare", "dataset"),
        ("linear-eval", "data", "prepare", "dataset"), ("linear-eval", "model", "pretrain", "model"),
        ("finetune", "data", "prepare", "dataset"), ("finetune", "model", "pretrain", "model"),
        ("transfer", "data", "prepare-2", "dataset"), ("transfer", "model", "pretrain", "model"),
    ):
        assert tasks[consumer]["inputs"]["artifacts"][artifact]["taskOutputArtifact"] == {"outputArtifactKey": key, "producerTask": producer}
    pretrain = tasks["pretrain"]
    for knob in ("epochs", "batch_size", "temperature", "backend", "num_nodes", "procs_per_node", "gpus_per_node", "image", "pvc_name", "timeout_s"):
        assert pretrain["inputs"]["parameters"][knob]["componentInputParameter"] == knob
    assert pretrain["inputs"]["parameters"]["settings"]["componentInputParameter"] == "pretrain_settings"
    assert "job_name" not in pretrain["inputs"]["parameters"]  # the run is read from the pod, not an input
    assert pretrain["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["finetune"]["inputs"]["parameters"]["label_fractions"]["componentInputParameter"] == "label_fractions"
    # the step and the PyTorchJob's pods share the PVC; the prepare steps mount it for sources there
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-pretrain", "exec-prepare", "exec-prepare-2"):
        assert executors[executor]["pvcMount"] == [{"componentInputParameter": "pvc_name", "mountPath": "/mnt/simclr"}]
    assert pretrain["inputs"]["parameters"]["pvc_mount_path"]["runtimeValue"]["constant"] == "/mnt/simclr"


# Placeholders whose value differs from run to run (kfp.dsl's pipeline-job and task ids/times).
RUN_PLACEHOLDERS = {
    getattr(dsl, name): name for name in dir(dsl)
    if name.endswith("_PLACEHOLDER") and any(word in name for word in ("JOB", "TASK_ID", "TIME"))
}


def _resolved_inputs(spec: dict, run: int) -> dict[str, dict]:
    """Every task's parameter inputs as a backend resolves them for run number ``run``, with
    the same run arguments (the defaults): what KFP's cache key is computed from."""
    defaults = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    context = {placeholder: f"{name.lower()}-of-run-{run}" for placeholder, name in RUN_PLACEHOLDERS.items()}
    resolved = {}
    for task_name, task in spec["root"]["dag"]["tasks"].items():
        values = {}
        for name, given in task["inputs"].get("parameters", {}).items():
            if "componentInputParameter" in given:
                values[name] = defaults[given["componentInputParameter"]]
            else:
                text = json.dumps(given.get("runtimeValue", given))
                for placeholder, value in context.items():
                    text = text.replace(placeholder, value)
                values[name] = json.loads(text)
        resolved[task_name] = values
    return resolved


def test_two_runs_with_the_same_arguments_give_every_task_the_same_inputs(tmp_path):
    """So that KFP's cache (its key includes the resolved inputs) reuses steps across runs."""
    assert "{{$.pipeline_job_uuid}}" in RUN_PLACEHOLDERS
    for path in (PIPELINE_FILE, compile_pipeline(tmp_path / "old.yaml", kfp_backend="2.3"), compile_pipeline(tmp_path / "n.yaml", mount_pvc=False)):
        spec, _ = _load_spec(path)
        first, second = _resolved_inputs(spec, 1), _resolved_inputs(spec, 2)
        assert first == second, {task: first[task] for task in first if first[task] != second[task]}
    # the check can fail: a task input that names the run differs between two runs
    spec, _ = _load_spec(PIPELINE_FILE)
    spec["root"]["dag"]["tasks"]["pretrain"]["inputs"]["parameters"]["job_name"] = {"runtimeValue": {"constant": dsl.PIPELINE_JOB_ID_PLACEHOLDER}}
    assert _resolved_inputs(spec, 1)["pretrain"] != _resolved_inputs(spec, 2)["pretrain"]


def test_pipeline_exposes_the_run_knobs_with_defaults():
    parameters = pipeline_parameters(PIPELINE_FILE)
    defaults = {name: spec.get("defaultValue") for name, spec in parameters.items()}
    assert defaults["source"] == "fashion-mnist" and defaults["transfer_source"] == "digits"
    assert defaults["image"] == DEFAULT_IMAGE and defaults["backend"] == "pytorchjob"
    assert defaults["num_nodes"] == 2 and defaults["label_fractions"] == [0.01, 0.1]
    for knob in ("source_uri", "download", "epochs", "batch_size", "temperature", "procs_per_node", "gpus_per_node", "pvc_name",
                 "keep_run_dir", "trainer_service_account", "trainer_shm_size", "eval_gpus", "eval_memory_limit", "prepare_cpu_request"):
        assert knob in parameters
    assert defaults["trainer_service_account"] == "simclr-trainer" and defaults["download"] is False
    assert parameters["epochs"]["description"] == "pretraining epochs"  # the UI shows each parameter's description


def test_a_pipeline_without_pvc_defaults_to_the_local_backend_and_submit_refuses_pytorchjob(tmp_path):
    path = compile_pipeline(tmp_path / "no_pvc.yaml", mount_pvc=False)
    spec, platform = _load_spec(path)
    assert platform == {}  # nothing that would keep a pod Pending for a missing PVC
    defaults = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["backend"] == "local"
    parameters = pipeline_parameters(path)
    check_backend(path, parameters, {})  # the default is fine
    for cluster_backend in ("pytorchjob", "trainjob"):
        with pytest.raises(UsageError, match=f"backend={cluster_backend} needs the PVC"):
            check_backend(path, parameters, {"backend": cluster_backend})
    with pytest.raises(UsageError, match="backend='slurm': expected one of pytorchjob, trainjob, local"):
        check_backend(PIPELINE_FILE, pipeline_parameters(PIPELINE_FILE), {"backend": "slurm"})
    from components.launcher import backend_names
    from pipelines.submit import BACKENDS

    assert sorted(BACKENDS) == backend_names()  # submit knows every backend the launcher has
    check_backend(PIPELINE_FILE, pipeline_parameters(PIPELINE_FILE), {"backend": "pytorchjob"})
    check_backend(PIPELINE_FILE, pipeline_parameters(PIPELINE_FILE), {"backend": "trainjob"})


def test_compile_with_another_image_puts_it_on_every_step(tmp_path):
    out = compile_pipeline(tmp_path / "p.yaml", image="registry.example.com/simclr:test")
    spec, _ = _load_spec(out)
    images = {executor["container"]["image"] for executor in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/simclr:test"}
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "registry.example.com/simclr:test"


def test_compile_command_writes_a_pipeline_file(tmp_path):
    out = tmp_path / "pipeline.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--out", str(out), "--image", "example/simclr:1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert components.load_component_from_file(str(out)).name == "simclr"


# ------------------------------------------------------------------------------ helpers


def test_cli_options_use_the_params_names():
    assert cli_options({"crop_min_scale": 0.2}, batch_size=64, label_fractions=[0.01, 0.1], download=False, seed=None) == [
        "--batch-size", "64", "--label-fractions", "0.01,0.1", "--download", "false", "--crop-min-scale", "0.2",
    ]
    assert cli_options({"batch_size": 32}, batch_size=64) == ["--batch-size", "32"]  # settings win
    # KFP hands numbers inside dict/list parameters over as doubles
    assert cli_options({"knn_bank_size": 200.0, "base_lr": 0.5, "l2_grid": [1.0, 0.001]}) == [
        "--knn-bank-size", "200", "--base-lr", "0.5", "--l2-grid", "1,0.001",
    ]


def test_confusion_matrix_counts_actual_by_predicted():
    rows = [{"actual": "a", "predicted": "a"}, {"actual": "a", "predicted": "b"}, {"actual": "b", "predicted": "b"}]
    assert confusion_matrix(rows, ["a", "b"]) == [[1, 1], [0, 1]]
    assert flatten({"x": 1, "labels_1pct": {"top1": 0.5}, "name": "s"}) == {"x": 1.0, "labels_1pct_top1": 0.5}


def test_submit_parses_and_checks_arguments_against_the_pipeline():
    parameters = pipeline_parameters(PIPELINE_FILE)
    arguments = parse_arguments(["epochs=10", "temperature=0.2", "source=cifar10", "label_fractions=[0.1]", "pretrain_settings={\"seed\": 3}"], parameters)
    assert arguments == {"epochs": 10, "temperature": 0.2, "source": "cifar10", "label_fractions": [0.1], "pretrain_settings": {"seed": 3}}
    with pytest.raises(UsageError, match="unknown pipeline parameter 'epoch'"):
        parse_arguments(["epoch=10"], parameters)
    with pytest.raises(UsageError, match="epochs='ten': expected integer"):
        parse_arguments(["epochs=ten"], parameters)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["epochs=3"], 2, "pass --host URL or set KFP_HOST"),
        (["--host", "http://127.0.0.1:9", "epochs=oops"], 2, "expected integer"),
        (["--host", "http://127.0.0.1:9", "epochs=3"], 1, "did not take the run"),
    ],
)
def test_submit_command_errors(args, code, message):
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "pipelines.submit", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr


# ------------------------------------------------------------------------------ kfp.local


def _executor_outputs(run_root: Path) -> dict[str, dict]:
    """task name -> the executor_output.json kfp.local wrote for it."""
    return {path.parent.name: json.loads(path.read_text()) for path in run_root.rglob("executor_output.json")}


@pytest.mark.slow  # about 80 s: the stage test covers every step's outcome in the fast suite
@pytest.mark.timeout(960)  # above the run's own 900 s limit, so a slow machine fails with its output
def test_whole_pipeline_runs_with_kfps_local_runner(tmp_path):
    """Every step, in the project's venv, on the texture dataset with a known answer
    (conftest.make_texture_folder): pretrained beats random init in every evaluation."""
    from tests.conftest import (
        OUTCOME_FINETUNE_SETTINGS, OUTCOME_PRETRAIN_SETTINGS, OUTCOME_TRANSFER_SETTINGS, make_texture_folder,
    )

    images = make_texture_folder(tmp_path / "images", train_per_class=100, test_per_class=60, seed=0)
    other = make_texture_folder(tmp_path / "other", train_per_class=15, test_per_class=30, seed=1)
    pretrain_settings = {k: v for k, v in OUTCOME_PRETRAIN_SETTINGS.items() if k not in ("epochs", "batch_size", "temperature")}
    script = f"""
from kfp import local
from pipelines.simclr_pipeline import simclr_pipeline
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root={str(tmp_path / 'root')!r})
simclr_pipeline(
    source="imagefolder", source_uri={str(images)!r}, transfer_source="imagefolder", transfer_uri={str(other)!r},
    label_fractions=[0.1], epochs={OUTCOME_PRETRAIN_SETTINGS['epochs']}, batch_size={OUTCOME_PRETRAIN_SETTINGS['batch_size']},
    temperature={OUTCOME_PRETRAIN_SETTINGS['temperature']}, backend="local", procs_per_node=1,
    prepare_settings={{"val_fraction": 0.2}}, pretrain_settings={pretrain_settings!r},
    finetune_settings={OUTCOME_FINETUNE_SETTINGS!r}, transfer_settings={OUTCOME_TRANSFER_SETTINGS!r},
)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    outputs = _executor_outputs(tmp_path / "root")
    assert {"prepare", "prepare-2", "pretrain", "linear-eval", "finetune", "transfer"} <= set(outputs)

    def metadata(task: str, artifact: str) -> dict:
        return outputs[task]["artifacts"][artifact]["artifacts"][0]["metadata"]

    pretrain = metadata("pretrain", "metrics")
    assert pretrain["epoch"] == 30 and pretrain["loss"] > 0 and 0 <= pretrain["neighbour_precision"] <= 1
    linear = metadata("linear-eval", "metrics")
    finetuned = metadata("finetune", "metrics")
    transfer = metadata("transfer", "metrics")
    summary = f"linear {linear}, finetune {finetuned}, transfer {transfer}"
    assert linear["top1"] >= linear["random_init_top1"] + 0.2, summary
    assert finetuned["labels_10pct_top1"] >= finetuned["labels_10pct_scratch_top1"] + 0.12, summary
    assert transfer["linear_top1"] >= transfer["linear_random_init_top1"] + 0.15, summary
    confusion = metadata("linear-eval", "confusion")["confusionMatrix"]
    assert len(confusion["annotationSpecs"]) == 3 and sum(map(sum, (row["row"] for row in confusion["rows"]))) == 180
    report = next((tmp_path / "root").rglob("pretrain/report"))
    assert "data:image/png;base64," in report.read_text()


class StubPipelinesAPI:
    """A stand-in for the KFP API server's v2beta1 REST endpoints that kfp.Client calls to
    create a run: it records each request (method, path, headers, JSON body) and answers."""

    def __init__(self):
        import http.server
        import threading

        self.requests: list[dict] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                stub.requests.append({"method": self.command, "path": self.path, "body": body,
                                      "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.path.startswith("/apis/v2beta1/experiments"):
                    answer = {"experiments": [{"experiment_id": "exp-1", "display_name": "simclr"}], "total_size": 1}
                elif self.path.startswith("/apis/v2beta1/runs"):
                    answer = {"run_id": "run-1", "display_name": "r", "state": "PENDING"}
                else:
                    answer = {}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def run_request(self) -> dict:
        (request,) = [r for r in self.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
        return request


@pytest.fixture
def pipelines_api():
    stub = StubPipelinesAPI()
    yield stub
    stub.server.shutdown()


def _submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "KF_PIPELINES_SA_TOKEN_PATH": "/nonexistent", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipelines.submit", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=environment)


def test_submit_sends_the_token_namespace_caching_and_pipeline_root(pipelines_api):
    result = _submit("--host", pipelines_api.url, "--token", "t0ken", "--namespace", "team-a", "--caching", "off",
                     "--pipeline-root", "s3://bucket/roots", "epochs=3", "backend=local")
    assert result.returncode == 0, result.stderr
    assert "submitted run run-1" in result.stdout
    assert all(r["headers"].get("authorization") == "Bearer t0ken" for r in pipelines_api.requests)
    assert "namespace=team-a" in pipelines_api.requests[0]["path"]
    run = pipelines_api.run_request()["body"]
    assert run["runtime_config"]["parameters"] == {"epochs": 3, "backend": "local"}
    assert run["runtime_config"]["pipeline_root"] == "s3://bucket/roots"
    assert run.get("service_account", "") == ""  # the profile's default-editor
    # the pipeline spec and the platform spec (the PVC mounts) travel together
    assert "exec-pretrain" in run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert tasks and all(task["cachingOptions"].get("enableCache") is not True for task in tasks.values())


def test_submit_keeps_the_pipelines_caching_and_takes_credentials_from_the_environment(pipelines_api, tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-token")
    result = _submit("--host", pipelines_api.url, env={"KF_PIPELINES_SA_TOKEN_PATH": str(token)})
    assert result.returncode == 0, result.stderr
    assert pipelines_api.requests[0]["headers"].get("authorization") == "Bearer projected-token"  # a Kubeflow notebook's token
    tasks = pipelines_api.run_request()["body"]["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert all(task["cachingOptions"]["enableCache"] is True for task in tasks.values())
    pipelines_api.requests.clear()
    result = _submit("--host", pipelines_api.url, env={"KFP_COOKIES": "authservice_session=abc"})
    assert result.returncode == 0, result.stderr
    assert pipelines_api.requests[0]["headers"].get("cookie") == "authservice_session=abc"


def test_the_prepare_step_reads_a_source_on_the_volume(tiny_folder, tmp_path):
    """``source_uri=/mnt/simclr/...``: the compiled prepare steps mount the PVC there, and the
    step reads an image folder from a path (here one standing for the mount) with kfp.local."""
    spec, platform = _load_spec(PIPELINE_FILE)
    mount = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-prepare"]["pvcMount"][0]
    assert mount["mountPath"] == "/mnt/simclr"
    volume = tmp_path / "mnt" / "simclr"
    (volume / "images").parent.mkdir(parents=True)
    __import__("shutil").copytree(tiny_folder, volume / "images")
    script = f"""
import json
from kfp import local
from components.prepare.component import prepare
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root={str(tmp_path / 'root')!r})
task = prepare(source="imagefolder", source_root={str(volume / 'images')!r}, label_fractions=[0.5], val_fraction=0.25)
print("METADATA", json.dumps(task.outputs["dataset"].metadata))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metadata = json.loads(result.stdout.split("METADATA ", 1)[1].splitlines()[0])
    assert metadata["source"] == "imagefolder" and metadata["test_images"] == 18
    assert metadata["train_images"] + metadata["val_images"] == 72
