"""KFP component: transfer evaluation on another dataset (`simclr transfer`)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def transfer(
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    settings: dict = {},
):
    """The pretrained encoder on another prepared dataset ``data``: linear (L2 chosen on
    val) and fine-tuned, each with its random-init baseline; ``metrics``: top1/top5 of
    each. ``settings``: `simclr transfer` options by params.yaml name."""
    import os
    import tempfile

    from components.common import cli_options, log_metrics, model_file, read_json, run_simclr

    with tempfile.TemporaryDirectory() as out:
        run_simclr(["transfer", "--model", model_file(model.path), "--data", data.path, "--out", out, *cli_options(settings)])
        log_metrics(metrics, read_json(os.path.join(out, "metrics.json")))
