"""The SimCLR pipeline: prepare -> pretrain -> linear eval, fine-tune, transfer.

Artifacts flow between the steps: the prepared Dataset into pretraining and every
evaluation, the pretrained Model into the three evaluations. Pretraining runs either as a
PyTorchJob of ``num_nodes`` pods sharing the PVC ``pvc_name`` with the step
(``backend="pytorchjob"``, the default) or inside the step's own container
(``backend="local"``, which is what kfp's local runner and single-node clusters use). The
step mounts the PVC either way (kfp's local runner ignores the mount): one task, not an
If/Else pair, because kfp.local cannot pick a ``dsl.OneOf`` artifact between branches.

``build_pipeline(image)`` returns the pipeline with every step on ``image``; ``simclr_pipeline``
is the one on the default image.
"""


import copy

from kfp import dsl, kubernetes

from components.common import DEFAULT_IMAGE
from components.finetune.component import finetune
from components.linear_eval.component import linear_eval
from components.prepare.component import prepare
from components.pretrain.component import pretrain
from components.transfer.component import transfer

PIPELINE_NAME = "simclr"
COMPONENTS = {"prepare": prepare, "pretrain": pretrain, "linear_eval": linear_eval, "finetune": finetune, "transfer": transfer}


def with_image(component, image: str):
    """A copy of a lightweight component whose container runs ``image``."""
    if image == component.component_spec.implementation.container.image:
        return component
    changed = copy.deepcopy(component)
    changed.component_spec.implementation.container.image = image
    return changed


def build_pipeline(image: str = DEFAULT_IMAGE):
    """The pipeline function (a kfp ``GraphComponent``) with every step's container on ``image``."""
    steps = {name: with_image(component, image) for name, component in COMPONENTS.items()}

    @dsl.pipeline(name=PIPELINE_NAME, description="SimCLR: prepare, pretrain (PyTorchJob), linear eval, semi-supervised fine-tune, transfer")
    def simclr(
        source: str = "fashion-mnist",
        source_uri: str = "",
        transfer_source: str = "digits",
        transfer_uri: str = "",
        label_fractions: list = [0.01, 0.1],
        image: str = image,
        epochs: int = 100,
        batch_size: int = 512,
        temperature: float = 0.5,
        backend: str = "pytorchjob",
        num_nodes: int = 2,
        procs_per_node: int = 1,
        gpus_per_node: int = 0,
        pvc_name: str = "simclr-data",
        timeout_s: int = 0,
        prepare_settings: dict = {},
        pretrain_settings: dict = {},
        linear_eval_settings: dict = {},
        finetune_settings: dict = {},
        transfer_settings: dict = {},
    ):
        data = steps["prepare"](
            source=source, source_root=source_uri, label_fractions=label_fractions, settings=prepare_settings,
        ).set_display_name("prepare")
        transfer_data = steps["prepare"](
            source=transfer_source, source_root=transfer_uri, val_fraction=0.1, label_fractions=[0.1],
        ).set_display_name("prepare transfer data")

        trained = steps["pretrain"](
            data=data.outputs["dataset"], epochs=epochs, batch_size=batch_size, temperature=temperature,
            backend=backend, num_nodes=num_nodes, procs_per_node=procs_per_node, gpus_per_node=gpus_per_node,
            image=image, pvc_name=pvc_name, job_name=dsl.PIPELINE_JOB_ID_PLACEHOLDER, timeout_s=timeout_s,
            settings=pretrain_settings,
        ).set_display_name("pretrain").set_retry(2)
        # The PyTorchJob's pods read the data and write checkpoints on this PVC, and so does the step.
        kubernetes.mount_pvc(trained, pvc_name=pvc_name, mount_path="/mnt/simclr")
        model = trained.outputs["model"]

        steps["linear_eval"](data=data.outputs["dataset"], model=model, settings=linear_eval_settings).set_display_name("linear eval")
        steps["finetune"](
            data=data.outputs["dataset"], model=model, label_fractions=label_fractions, settings=finetune_settings,
        ).set_display_name("fine-tune")
        steps["transfer"](data=transfer_data.outputs["dataset"], model=model, settings=transfer_settings).set_display_name("transfer")

    return simclr


simclr_pipeline = build_pipeline()
