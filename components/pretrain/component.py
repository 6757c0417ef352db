"""KFP component: SimCLR pretraining, here (torchrun) or as a multi-node PyTorchJob or TrainJob."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def pretrain(
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    epochs: int = 100,
    batch_size: int = 512,
    temperature: float = 0.5,
    backend: str = "pytorchjob",
    num_nodes: int = 2,
    procs_per_node: int = 1,
    gpus_per_node: int = 0,
    image: str = "",
    pvc_name: str = "",
    pvc_mount_path: str = "/mnt/simclr",
    job_name: str = "",
    timeout_s: int = 0,
    keep_run_dir: bool = False,
    trainer_cpu_request: str = "2",
    trainer_cpu_limit: str = "4",
    trainer_memory_request: str = "8Gi",
    trainer_memory_limit: str = "16Gi",
    trainer_shm_size: str = "",
    trainer_service_account: str = "simclr-trainer",
    queue_name: str = "",
    priority_class: str = "",
    image_pull_secrets: list = [],
    runtime_name: str = "torch-distributed",
    runtime_kind: str = "ClusterTrainingRuntime",
    max_restarts: int = 3,
    stage_size: str = "",
    node_selector: dict = {},
    tolerations: list = [],
    settings: dict = {},
):
    """Pretrain on ``data``; write ``model`` (a directory: model.pt and the DVCLive curves),
    per-epoch ``metrics`` (last epoch's loss, kNN accuracy, ...) and an HTML ``report``.

    ``backend``: "local" runs ``torchrun --nproc-per-node procs_per_node simclr pretrain`` in
    this step's container (one node: ``num_nodes`` is not used, no PVC is needed);
    "pytorchjob" (Training Operator v1) or "trainjob" (Kubeflow Trainer v2, through the runtime
    ``runtime_kind``/``runtime_name``) creates a job of ``num_nodes`` pods (``procs_per_node``
    processes on CPU, one per GPU with ``gpus_per_node``, ``image``, the ``trainer_*`` resources
    and service account, ``node_selector``, ``tolerations``, Kueue's ``queue_name``,
    ``priority_class``, ``image_pull_secrets``; torchrun restarts them up to ``max_restarts``
    times) that reads and writes through the PVC ``pvc_name`` mounted at ``pvc_mount_path``
    here and in the job's pods. ``stage_size`` (e.g. "50Gi"; "" = off) gives every pod an
    emptyDir of that size at /stage into which it copies the dataset from the PVC once, verified,
    and trains from the copy (``simclr pretrain --stage-dir``; not used by backend local).

    The job and its directory on the PVC (``pipeline-runs/<job>/``) are named after the run,
    read from this pod's labels (not an input, so that identical runs share a cache key), or
    after ``job_name`` when given: a retried step resumes the run's checkpoints. The directory
    is deleted once the model is in the artifact, unless ``keep_run_dir``. ``timeout_s``: 0 =
    wait as long as it takes. ``settings``: any other `simclr pretrain` option by its
    params.yaml name.
    """
    import os
    import shutil
    import tempfile

    from components.common import DEFAULT_IMAGE, cli_options, log_metrics, read_json, run_simclr
    from components.launcher import PretrainJob, collect_from_volume, job_name_for, launch, pipeline_run_id, stage_on_volume

    options = cli_options(settings, epochs=epochs, batch_size=batch_size, temperature=temperature)
    stage = ""
    if backend == "local":
        if num_nodes != 1:
            print(f"pretrain: backend 'local' runs on this step's pod only; num_nodes={num_nodes} applies to 'pytorchjob'", flush=True)
        name = job_name_for(job_name or "simclr-pretrain")
        data_dir, run_dir = data.path, model.path
    else:
        name = job_name_for(job_name or pipeline_run_id(log=print) or "simclr-pretrain")
        stage = stage_on_volume(data.path, pvc_name, pvc_mount_path, name, log=print)
        data_dir, run_dir = os.path.join(stage, "data"), os.path.join(stage, "pretrain")
    job = PretrainJob(
        name=name, image=image or DEFAULT_IMAGE, simclr_args=["--data", data_dir, "--out", run_dir, *options],
        num_nodes=1 if backend == "local" else num_nodes, procs_per_node=procs_per_node, gpus_per_node=gpus_per_node,
        cpu_request=trainer_cpu_request, cpu_limit=trainer_cpu_limit, memory_request=trainer_memory_request,
        memory_limit=trainer_memory_limit, shm_size=trainer_shm_size, service_account=trainer_service_account,
        queue_name=queue_name, priority_class=priority_class, image_pull_secrets=list(image_pull_secrets),
        runtime_name=runtime_name, runtime_kind=runtime_kind, max_restarts=max_restarts,
        node_selector=dict(node_selector), tolerations=list(tolerations),
        pvc_name=pvc_name if stage else "", pvc_mount_path=pvc_mount_path, stage_size=stage_size if stage else "",
    )
    launch(job, backend=backend, timeout_s=timeout_s, log=print)
    if stage:  # bring the result from the PVC into the artifact
        collect_from_volume(stage, model.path, keep=keep_run_dir, log=print)

    with tempfile.TemporaryDirectory() as scratch:
        run_simclr(["report", "--run", model.path, "--data", data.path, "--out", scratch])
        shutil.copy2(os.path.join(scratch, "report.html"), report.path)
        summary = read_json(os.path.join(scratch, "metrics.json"))
    last_epoch = read_json(os.path.join(model.path, "live", "metrics.json"))
    log_metrics(metrics, {**last_epoch, **summary})
    model.metadata.update({"epochs": epochs, "batch_size": batch_size, "temperature": temperature, "nodes": num_nodes if backend != "local" else 1})
