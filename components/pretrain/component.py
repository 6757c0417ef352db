"""KFP component: SimCLR pretraining, here (torchrun) or as a multi-node PyTorchJob."""

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
    node_selector: dict = {},
    tolerations: list = [],
    settings: dict = {},
):
    """Pretrain on ``data``; write ``model`` (a directory: model.pt and the DVCLive curves),
    per-epoch ``metrics`` (last epoch's loss, kNN accuracy, ...) and an HTML ``report``.

    ``backend``: "local" runs ``torchrun --nproc-per-node procs_per_node simclr pretrain`` in
    this step's container (one node); "pytorchjob" creates a PyTorchJob of ``num_nodes``
    pods (Master + Workers, ``procs_per_node`` processes and ``gpus_per_node`` GPUs each,
    ``image``, ``node_selector``, ``tolerations``) that reads and writes through the PVC
    ``pvc_name`` mounted at ``pvc_mount_path`` here and in the job's pods; the job resumes
    from its last checkpoint there when a pod restarts or the step is retried under the same
    ``job_name``. ``timeout_s``: 0 = wait as long as it takes. ``settings``: any other
    `simclr pretrain` option by its params.yaml name.
    """
    import os
    import shutil
    import tempfile

    from components.common import DEFAULT_IMAGE, cli_options, copy_tree, log_metrics, read_json, run_simclr
    from components.launcher import PretrainJob, job_name_for, launch

    options = cli_options(settings, epochs=epochs, batch_size=batch_size, temperature=temperature)
    name = job_name_for(job_name or os.environ.get("KFP_POD_NAME", "") or "simclr-pretrain")
    if backend == "local":
        data_dir, run_dir = data.path, model.path
    else:
        if not pvc_name:
            raise ValueError("backend 'pytorchjob' needs pvc_name: the PyTorchJob's pods read the data and write checkpoints there")
        stage = os.path.join(pvc_mount_path, "pipeline-runs", name)
        data_dir, run_dir = os.path.join(stage, "data"), os.path.join(stage, "pretrain")
        if not os.path.isfile(os.path.join(data_dir, "manifest.json")):  # a retried step keeps its staged copy
            copy_tree(data.path, data_dir + ".partial")
            os.replace(data_dir + ".partial", data_dir)
    job = PretrainJob(
        name=name, image=image or DEFAULT_IMAGE, simclr_args=["--data", data_dir, "--out", run_dir, *options],
        num_nodes=num_nodes, procs_per_node=procs_per_node, gpus_per_node=gpus_per_node,
        node_selector=dict(node_selector), tolerations=list(tolerations),
        pvc_name=pvc_name, pvc_mount_path=pvc_mount_path,
    )
    launch(job, backend=backend, timeout_s=timeout_s, log=print)
    if run_dir != model.path:  # bring the result from the PVC into the artifact
        os.makedirs(model.path, exist_ok=True)
        shutil.copy2(os.path.join(run_dir, "model.pt"), os.path.join(model.path, "model.pt"))
        copy_tree(os.path.join(run_dir, "live"), os.path.join(model.path, "live"))

    with tempfile.TemporaryDirectory() as scratch:
        run_simclr(["report", "--run", model.path, "--data", data.path, "--out", scratch])
        shutil.copy2(os.path.join(scratch, "report.html"), report.path)
        summary = read_json(os.path.join(scratch, "metrics.json"))
    last_epoch = read_json(os.path.join(model.path, "live", "metrics.json"))
    log_metrics(metrics, {**last_epoch, **summary})
    model.metadata.update({"epochs": epochs, "batch_size": batch_size, "temperature": temperature, "nodes": num_nodes})
