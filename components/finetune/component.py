"""KFP component: semi-supervised fine-tuning on label subsets (`simclr finetune`)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def finetune(
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    label_fractions: list = [0.01, 0.1],
    settings: dict = {},
):
    """Fine-tune the whole network on each class-balanced label subset of ``data`` (the
    fractions must have been prepared) and the same network from scratch as the baseline;
    ``metrics``: labels_<pct>pct_top1/top5 and scratch_top1/top5 on test. ``settings``:
    `simclr finetune` options by params.yaml name."""
    import os
    import tempfile

    from components.common import cli_options, log_metrics, model_file, read_json, run_simclr

    options = cli_options(settings, label_fractions=label_fractions)
    with tempfile.TemporaryDirectory() as out:
        run_simclr(["finetune", "--model", model_file(model.path), "--data", data.path, "--out", out, *options])
        log_metrics(metrics, read_json(os.path.join(out, "metrics.json")))
