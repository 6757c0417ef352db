"""The SimCLR pipeline: prepare -> pretrain -> linear eval, fine-tune, transfer.

Artifacts flow between the steps: the prepared Dataset into pretraining and every
evaluation, the pretrained Model into the three evaluations. Pretraining runs either as a
PyTorchJob of ``num_nodes`` pods sharing the PVC ``pvc_name`` with the step
(``backend="pytorchjob"``, the default) or inside the step's own container
(``backend="local"``, which is what kfp's local runner and single-node clusters use). The
pretrain step and the prepare steps mount the PVC (kfp's local runner ignores the mount): one
task, not an If/Else pair, because kfp.local cannot pick a ``dsl.OneOf`` artifact between
branches. ``build_pipeline(mount_pvc=False)`` leaves the mount out, for clusters without a
PVC, where only ``backend="local"`` can work.

Nothing that differs from run to run is a task input: KFP's cache key includes every
resolved input, so two runs with the same parameters reuse each other's steps. The pretrain
step finds its run from its own pod (components/launcher/run_identity.py).

KFP backends differ (checked in kubeflow/pipelines' source; README: supported versions):
- before 2.4.1 the driver parses a step's Kubernetes config strictly, so the config keeps
  only fields those backends know (:func:`portable_platform_config`);
- before 2.4.0 a resource or accelerator given by a pipeline parameter is dropped without a
  word, so ``kfp_backend="2.3"`` (or "2.2") compiles the step compute as constants
  (``compute``) and leaves those parameters out of the pipeline;
- before 2.4.1 ``set_retry`` is ignored (nothing to compile around: the README says so).

The run parameters are :data:`PARAMETERS`: one table for the pipeline's signature, its
descriptions in the UI, ``pipelines.submit --list`` and the README.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

from kfp import dsl, kubernetes

from components.common import DEFAULT_IMAGE
from components.finetune.component import finetune
from components.linear_eval.component import linear_eval
from components.prepare.component import prepare
from components.pretrain.component import pretrain
from components.transfer.component import transfer

PIPELINE_NAME = "simclr"
COMPONENTS = {"prepare": prepare, "pretrain": pretrain, "linear_eval": linear_eval, "finetune": finetune, "transfer": transfer}
PVC_MOUNT_PATH = "/mnt/simclr"
KFP_BACKENDS = ("2.2", "2.3", "2.4", "2.5")  # the KFP backend releases a pipeline can be compiled for
PARAMETERIZED_COMPUTE_SINCE = "2.4"
# Fields of kfp-kubernetes' config that KFP backends before 2.4.1 do not know: their drivers
# fail the step on an unknown field. kfp-kubernetes writes each value twice (the new field and
# the deprecated one); every backend up to 2.5 reads the deprecated one when the new is absent.
# ("optional" is written as false, which is what the old backends do anyway.)
NEW_ONLY_FIELDS = {"pvcMount": ("pvcNameParameter",), "secretAsEnv": ("secretNameParameter", "optional")}
S3_SECRET_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}  # Kubeflow's MinIO secret


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str
    type: type
    default: Any
    help: str
    compute: bool = False  # a step pod's resources: a constant when compiled for KFP < 2.4


def _p(name, kind, default, text, compute=False) -> Parameter:
    return Parameter(name, kind, default, text, compute)


PARAMETERS: tuple[Parameter, ...] = (
    _p("source", str, "fashion-mnist", "pretraining dataset: fashion-mnist, cifar10, cifar100, stl10, digits, imagefolder"),
    _p("source_uri", str, "", "where its files are: a path on the PVC (/mnt/simclr/...), gs:// or s3://; '' = the image's own copy (fashion-mnist, digits)"),
    _p("download", bool, False, "let torchvision download the source into source_uri (needs internet in the cluster)"),
    _p("transfer_source", str, "digits", "the transfer dataset"),
    _p("transfer_uri", str, "", "where its files are"),
    _p("label_fractions", list, [0.01, 0.1], "label subsets prepared and fine-tuned on"),
    _p("image", str, DEFAULT_IMAGE, "the trainer pods' image (the steps' own image is fixed when compiling)"),
    _p("epochs", int, 100, "pretraining epochs"),
    _p("batch_size", int, 512, "global pretraining batch size"),
    _p("temperature", float, 0.5, "NT-Xent temperature"),
    _p("backend", str, "pytorchjob", "pytorchjob: a Training Operator PyTorchJob; trainjob: a Kubeflow Trainer v2 TrainJob; local: torchrun in the pretrain step's pod"),
    _p("num_nodes", int, 2, "trainer pods of the PyTorchJob or TrainJob; not used by backend local"),
    _p("procs_per_node", int, 1, "training processes per pod on CPU (with GPUs: one per GPU)"),
    _p("gpus_per_node", int, 0, "nvidia.com/gpu per trainer pod, each driven by its own process (NCCL)"),
    _p("pvc_name", str, "simclr-data", "the ReadWriteMany PVC the prepare and pretrain steps and the trainer pods mount at /mnt/simclr"),
    _p("keep_run_dir", bool, False, "keep pipeline-runs/<job>/ (staged data, checkpoints) on the PVC after pretraining succeeds"),
    _p("timeout_s", int, 0, "fail pretraining after this many seconds (0: no limit)"),
    _p("trainer_cpu_request", str, "2", "CPU request of each trainer pod"),
    _p("trainer_cpu_limit", str, "4", "CPU limit of each trainer pod"),
    _p("trainer_memory_request", str, "8Gi", "memory request of each trainer pod"),
    _p("trainer_memory_limit", str, "16Gi", "memory limit of each trainer pod"),
    _p("trainer_shm_size", str, "", "size of each trainer pod's in-memory /dev/shm ('' = 2Gi per GPU, at least 2Gi)"),
    _p("trainer_service_account", str, "simclr-trainer", "service account of the trainer pods ('' = the namespace's default)"),
    _p("trainer_node_selector", dict, {}, 'node selector of the trainer pods, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}'),
    _p("trainer_tolerations", list, [], "tolerations of the trainer pods (Kubernetes dicts)"),
    _p("trainer_queue_name", str, "", "Kueue LocalQueue of the trainer job (label kueue.x-k8s.io/queue-name; '' = none)"),
    _p("trainer_priority_class", str, "", "PriorityClass of the PyTorchJob's pods (a TrainJob takes it from its runtime)"),
    _p("trainer_image_pull_secrets", list, [], "Secrets the trainer pods pull the image with"),
    _p("trainer_max_restarts", int, 3, "times torchrun restarts every pod's processes after one failed, resuming from the checkpoint"),
    _p("trainer_stage_size", str, "", "node-local staging: an emptyDir of this size (e.g. 50Gi) at /stage in each trainer pod, which copies the dataset there once and trains from it ('' = read the PVC)"),
    _p("trainjob_runtime", str, "torch-distributed", "the Trainer v2 runtime a TrainJob uses"),
    _p("trainjob_runtime_kind", str, "ClusterTrainingRuntime", "ClusterTrainingRuntime or TrainingRuntime (in the namespace)"),
    _p("prepare_cpu_request", str, "1", "CPU request of the prepare steps", compute=True),
    _p("prepare_cpu_limit", str, "2", "CPU limit of the prepare steps", compute=True),
    _p("prepare_memory_request", str, "2Gi", "memory request of the prepare steps", compute=True),
    _p("prepare_memory_limit", str, "8Gi", "memory limit of the prepare steps", compute=True),
    _p("pretrain_cpu_request", str, "1", "CPU request of the pretrain step (its training with backend local)", compute=True),
    _p("pretrain_cpu_limit", str, "4", "CPU limit of the pretrain step", compute=True),
    _p("pretrain_memory_request", str, "2Gi", "memory request of the pretrain step", compute=True),
    _p("pretrain_memory_limit", str, "16Gi", "memory limit of the pretrain step", compute=True),
    # Accelerator counts are strings: KFP's driver resolves a resource placeholder with the
    # parameter's string value only (a number parameter would resolve to "", i.e. no GPU).
    _p("pretrain_gpus", str, "0", "accelerators of the pretrain step's own pod (backend local)", compute=True),
    _p("eval_cpu_request", str, "1", "CPU request of linear eval, fine-tune and transfer", compute=True),
    _p("eval_cpu_limit", str, "4", "CPU limit of the evaluation steps", compute=True),
    _p("eval_memory_request", str, "4Gi", "memory request of the evaluation steps", compute=True),
    _p("eval_memory_limit", str, "16Gi", "memory limit of the evaluation steps", compute=True),
    _p("eval_gpus", str, "0", "accelerators of each evaluation step (they use CUDA when they have one)", compute=True),
    _p("accelerator_type", str, "nvidia.com/gpu", "the accelerator resource of pretrain_gpus and eval_gpus", compute=True),
    _p("prepare_settings", dict, {}, 'any other `simclr prepare` setting by its params.yaml name, e.g. {"image_size": 32}'),
    _p("pretrain_settings", dict, {}, 'any other `simclr pretrain` setting, e.g. {"crop_min_scale": 0.2}'),
    _p("linear_eval_settings", dict, {}, "any other `simclr linear-eval` setting"),
    _p("finetune_settings", dict, {}, "any other `simclr finetune` setting"),
    _p("transfer_settings", dict, {}, "any other `simclr transfer` setting"),
)


def with_image(component, image: str):
    """A copy of a lightweight component whose container runs ``image``."""
    if image == component.component_spec.implementation.container.image:
        return component
    changed = copy.deepcopy(component)
    changed.component_spec.implementation.container.image = image
    return changed


def portable_platform_config(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Drop the fields of ``task``'s Kubernetes config that old KFP backends reject, keeping
    the deprecated equivalents that kfp-kubernetes writes beside them."""
    config = task.platform_config.get("kubernetes", {})
    for section, fields in NEW_ONLY_FIELDS.items():
        for entry in config.get(section, []):
            if entry.get("optional"):
                raise ValueError(f"{section} with optional=true cannot be written for KFP backends before 2.4.1")
            for field in fields:
                entry.pop(field, None)
    return task


def _set_compute(task: dsl.PipelineTask, value, step: str, gpus: str | None = None) -> dsl.PipelineTask:
    """The step pod's CPU and memory (requests and limits) and, with ``gpus``, its accelerators."""
    task.set_cpu_request(value(f"{step}_cpu_request")).set_cpu_limit(value(f"{step}_cpu_limit"))
    task.set_memory_request(value(f"{step}_memory_request")).set_memory_limit(value(f"{step}_memory_limit"))
    if gpus is not None:
        count = value(gpus)
        if not isinstance(count, str) or count.strip("0"):  # a constant "0" means none
            task.set_accelerator_type(value("accelerator_type")).set_accelerator_limit(count)
    return task


def _check_compute(kfp_backend: str, compute: dict[str, Any]) -> dict[str, Any]:
    if kfp_backend not in KFP_BACKENDS:
        raise ValueError(f"kfp_backend {kfp_backend!r}: expected one of {', '.join(KFP_BACKENDS)}")
    known = {p.name: p for p in PARAMETERS if p.compute}
    for name, value in compute.items():
        if name not in known:
            raise ValueError(f"compute setting {name!r} is not a step compute parameter; known: {', '.join(known)}")
        if not isinstance(value, known[name].type):
            raise ValueError(f"compute setting {name}={value!r}: expected {known[name].type.__name__}")
    if compute and kfp_backend >= PARAMETERIZED_COMPUTE_SINCE:
        raise ValueError(f"compute settings are fixed only for KFP backends before {PARAMETERIZED_COMPUTE_SINCE}; "
                         "from it on they are run parameters")
    return {**{name: p.default for name, p in known.items()}, **compute}


def build_pipeline(image: str = DEFAULT_IMAGE, mount_pvc: bool = True, s3_endpoint: str = "", s3_secret: str = "",
                   kfp_backend: str = KFP_BACKENDS[-1], compute: dict[str, Any] | None = None):
    """The pipeline function (a kfp ``GraphComponent``) with every step's container on ``image``.

    Args:
        image: the image of every step (and the default of the trainer pods' image).
        mount_pvc: mount the PVC ``pvc_name`` on the prepare and pretrain steps; without it
            only ``backend="local"`` works (for clusters without a ReadWriteMany volume).
        s3_endpoint, s3_secret: for s3:// sources on an S3-compatible server: the endpoint
            (e.g. ``http://minio-service.kubeflow:9000``) and a Secret with ``accesskey`` and
            ``secretkey`` (Kubeflow's ``mlpipeline-minio-artifact``), set on the prepare steps.
        kfp_backend: the oldest KFP backend release the pipeline must run on ("2.2" ... "2.5").
        compute: for backends before 2.4: the step compute settings (``eval_gpus``, ...)
            compiled in as constants instead of the defaults.
    """
    fixed = _check_compute(kfp_backend, compute or {})
    if kfp_backend >= PARAMETERIZED_COMPUTE_SINCE:
        fixed = {}  # run parameters
    parameters = [p for p in PARAMETERS if p.name not in fixed]
    steps = {name: with_image(component, image) for name, component in COMPONENTS.items()}

    def simclr(*values):
        run = dict(zip((p.name for p in parameters), values))

        def value(name: str):
            return fixed[name] if name in fixed else run[name]

        def prepare_step(display_name: str, **inputs):
            task = steps["prepare"](**inputs).set_display_name(display_name)
            _set_compute(task, value, "prepare")
            if s3_endpoint:
                task.set_env_variable("AWS_ENDPOINT_URL_S3", s3_endpoint)
            if s3_secret:
                kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)
            if mount_pvc:  # sources on the PVC: source_uri=/mnt/simclr/...
                kubernetes.mount_pvc(task, pvc_name=run["pvc_name"], mount_path=PVC_MOUNT_PATH)
            return portable_platform_config(task)

        data = prepare_step(
            "prepare", source=run["source"], source_root=run["source_uri"], download=run["download"],
            label_fractions=run["label_fractions"], settings=run["prepare_settings"],
        )
        transfer_data = prepare_step(
            "prepare transfer data", source=run["transfer_source"], source_root=run["transfer_uri"], download=run["download"],
            val_fraction=0.1, label_fractions=[0.1],
        )

        trained = steps["pretrain"](
            data=data.outputs["dataset"], epochs=run["epochs"], batch_size=run["batch_size"], temperature=run["temperature"],
            backend=run["backend"], num_nodes=run["num_nodes"], procs_per_node=run["procs_per_node"],
            gpus_per_node=run["gpus_per_node"], image=run["image"], pvc_name=run["pvc_name"] if mount_pvc else "",
            pvc_mount_path=PVC_MOUNT_PATH, timeout_s=run["timeout_s"], keep_run_dir=run["keep_run_dir"],
            trainer_cpu_request=run["trainer_cpu_request"], trainer_cpu_limit=run["trainer_cpu_limit"],
            trainer_memory_request=run["trainer_memory_request"], trainer_memory_limit=run["trainer_memory_limit"],
            trainer_shm_size=run["trainer_shm_size"], trainer_service_account=run["trainer_service_account"],
            queue_name=run["trainer_queue_name"], priority_class=run["trainer_priority_class"],
            image_pull_secrets=run["trainer_image_pull_secrets"], max_restarts=run["trainer_max_restarts"],
            stage_size=run["trainer_stage_size"],
            runtime_name=run["trainjob_runtime"], runtime_kind=run["trainjob_runtime_kind"],
            node_selector=run["trainer_node_selector"], tolerations=run["trainer_tolerations"], settings=run["pretrain_settings"],
        ).set_display_name("pretrain").set_retry(2)
        _set_compute(trained, value, "pretrain", gpus="pretrain_gpus")
        if mount_pvc:  # the PyTorchJob's pods read the data and write checkpoints on this PVC, and so does the step
            kubernetes.mount_pvc(trained, pvc_name=run["pvc_name"], mount_path=PVC_MOUNT_PATH)
            portable_platform_config(trained)
        model = trained.outputs["model"]

        dataset = data.outputs["dataset"]
        evaluations = [
            steps["linear_eval"](data=dataset, model=model, settings=run["linear_eval_settings"]).set_display_name("linear eval"),
            steps["finetune"](
                data=dataset, model=model, label_fractions=run["label_fractions"], settings=run["finetune_settings"],
            ).set_display_name("fine-tune"),
            steps["transfer"](data=transfer_data.outputs["dataset"], model=model, settings=run["transfer_settings"]).set_display_name("transfer"),
        ]
        for task in evaluations:
            _set_compute(task, value, "eval", gpus="eval_gpus")

    defaults = {"image": image, **({} if mount_pvc else {"backend": "local", "num_nodes": 1})}
    simclr.__signature__ = inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(p.name, p.default), annotation=p.type)
        for p in parameters
    ])
    simclr.__doc__ = "SimCLR: prepare, pretrain (PyTorchJob), linear eval, semi-supervised fine-tune, transfer.\n\nArgs:\n" + "".join(
        f"    {p.name}: {p.help}\n" for p in parameters
    )
    return dsl.pipeline(name=PIPELINE_NAME)(simclr)


simclr_pipeline = build_pipeline()
